"""Known-answer tests of the pseudo masks (training/sim/pseudo.py, SIM_SPEC 7.6 and 7.8)."""

from __future__ import annotations

import torch

from training.sim.pseudo import full_resolution_masks, instance_importance, pseudo_masks


def _box(m: int, h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    b = torch.zeros(m, h, w)
    b[:, y0:y1, x0:x1] = 1.0
    return b


def test_weight_zero_outside_box_and_in_band() -> None:
    g = torch.Generator().manual_seed(0)
    mi, ms = torch.rand(3, 8, 8, generator=g), torch.rand(3, 8, 8, generator=g)
    box = _box(3, 8, 8, 2, 6, 1, 7)
    out = pseudo_masks(mi, ms, box)
    torch.testing.assert_close(out.blended, 0.5 * ms + 0.5 * mi)
    assert (out.weight[box == 0] == 0).all() and (out.target[box == 0] == 0).all()
    thr = out.tau_high[:, None, None].expand_as(mi)
    band = (out.blended >= 0.4) & (out.blended <= thr)
    assert (out.weight[band] == 0).all()
    confident = ((out.blended > thr) | (out.blended < 0.4)) & (box > 0)
    assert (out.weight[confident] == 1).all()
    assert (out.target <= out.weight).all()
    assert set(out.target.unique().tolist()) <= {0.0, 1.0}


def test_alpha_zero_uses_instance_map_only() -> None:
    g = torch.Generator().manual_seed(1)
    mi = torch.rand(2, 6, 6, generator=g)
    box = _box(2, 6, 6, 0, 6, 0, 6)
    a = pseudo_masks(mi, torch.rand(2, 6, 6, generator=g), box, alpha=0.0, adaptive_high=False)
    b = pseudo_masks(mi, torch.rand(2, 6, 6, generator=g), box, alpha=0.0, adaptive_high=False)
    assert torch.equal(a.target, (mi > 0.7).float())
    assert torch.equal(a.target, b.target) and torch.equal(a.weight, b.weight)
    c = pseudo_masks(torch.rand(2, 6, 6, generator=g), mi, box, alpha=1.0, adaptive_high=False)
    assert torch.equal(c.target, (mi > 0.7).float())  # alpha = 1: semantic map only


def test_adaptive_threshold_area_matched_and_clamped() -> None:
    # One instance, box covers everything. M_I > 0.7 on 3 pixels -> n_pos = 3, so tau_high is
    # the 4th largest blended value (0-based rank 3).
    mi = torch.tensor([[[0.9, 0.9, 0.9, 0.1, 0.1, 0.1]]])
    box = torch.ones(1, 1, 6)
    ms_in = torch.tensor([[[1.0, 0.9, 0.8, 0.6, 0.2, 0.0]]])  # blended 0.95 .9 .85 .35 .15 .05
    out = pseudo_masks(mi, ms_in, box)
    assert abs(float(out.tau_high[0]) - 0.7) < 1e-6  # 0.35 clamped up to 0.7
    assert out.target.tolist() == [[[1.0, 1.0, 1.0, 0.0, 0.0, 0.0]]]
    ms_mid = torch.tensor([[[1.0, 1.0, 1.0, 1.4, 0.0, 0.0]]])  # rank-3 blended = 0.75
    out = pseudo_masks(mi, ms_mid, box)
    assert abs(float(out.tau_high[0]) - 0.75) < 1e-6
    assert int(out.target.sum()) == 3  # area matched to #(M_I > 0.7)
    mi_hi = torch.full((1, 1, 6), 0.95)
    mi_hi[..., -1] = 0.5  # n_pos = 5: rank-5 blended = 0.5 * 0.5 + 0.5 * 0.98 = 0.74
    out = pseudo_masks(mi_hi, torch.full((1, 1, 6), 0.98), box)
    assert abs(float(out.tau_high[0]) - 0.74) < 1e-6
    out = pseudo_masks(torch.ones(1, 1, 6), torch.ones(1, 1, 6), box)  # all 1 -> clamp to 0.8
    assert abs(float(out.tau_high[0]) - 0.8) < 1e-6
    g = torch.Generator().manual_seed(2)
    out = pseudo_masks(torch.rand(5, 9, 9, generator=g), torch.rand(5, 9, 9, generator=g),
                       _box(5, 9, 9, 1, 8, 2, 9))
    assert ((out.tau_high >= 0.7) & (out.tau_high <= 0.8)).all()


def test_adaptive_threshold_ignores_pixels_outside_box() -> None:
    mi = torch.full((1, 4, 4), 0.9)  # M_I > 0.7 everywhere, but only 4 pixels in the box
    box = _box(1, 4, 4, 0, 2, 0, 2)
    ms = torch.full((1, 4, 4), 0.9)
    out = pseudo_masks(mi, ms, box)
    # rank 4 of blended*box sorted descending = 0 (outside box) -> clamped to 0.7.
    assert abs(float(out.tau_high[0]) - 0.7) < 1e-6
    assert int(out.target.sum()) == 4


def test_empty_input() -> None:
    z = torch.zeros(0, 4, 4)
    out = pseudo_masks(z, z, z)
    assert out.target.shape == (0, 4, 4) and out.tau_high.shape == (0,)


def test_instance_importance_by_hand() -> None:
    prob = torch.tensor([[[0.8, 0.8, 0.8, 0.3]], [[0.5, 0.5, 0.5, 0.5]]])
    mask = torch.tensor([[[1, 1, 1, 0]], [[0, 0, 0, 0]]], dtype=torch.bool)
    torch.testing.assert_close(instance_importance(prob, mask), torch.tensor([0.6, 0.0]))


def test_full_resolution_masks() -> None:
    prob = torch.zeros(2, 4, 4)
    prob[0] = 0.9
    prob[1, :2] = 0.9  # top half
    box = torch.zeros(2, 16, 16)
    box[:, 2:14, 2:14] = 1
    out = full_resolution_masks(prob, torch.tensor([0.8, 0.8]), box)
    assert out.dtype == torch.bool and out.shape == (2, 16, 16)
    assert torch.equal(out[0], box[0] > 0)  # constant probability: the whole box
    # Bilinear x4 (align_corners=False): output row y samples source row (y + 0.5) / 4 - 0.5, so
    # rows 0-5 read 0.9 (source rows <= 0.875) and row 6 reads 0.9 * 0.875 = 0.7875 < 0.8.
    assert out[1, 2:6, 2:14].all() and not out[1, 6:].any() and not out[1, :2].any()
    assert torch.equal(full_resolution_masks(prob, 0.95, box), torch.zeros(2, 16, 16).bool())


def test_background_only_pseudo_loss_by_hand() -> None:
    """``sim.pseudo_foreground=false``: W keeps the confident background only, so the pseudo
    loss is the mean BCE towards 0 over those pixels plus a constant dice of 1 (no gradient),
    the same loss as the diagnostic ``tau_high_range=[1.01, 1.01]`` (no foreground labels)."""
    from training.losses import bce_dice_loss
    from training.sim.iteration import pseudo_loss_weight
    from training.train_config import TrainConfig

    # One instance, a 2x3 box; blended = M_I (alpha 0): 0.9 0.9 0.5 / 0.1 0.2 0.9.
    mi = torch.zeros(1, 4, 5)
    mi[0, 1, 1:4] = torch.tensor([0.9, 0.9, 0.5])
    mi[0, 2, 1:4] = torch.tensor([0.1, 0.2, 0.9])
    box = _box(1, 4, 5, 1, 3, 1, 4)
    pm = pseudo_masks(mi, torch.zeros_like(mi), box, alpha=0.0, adaptive_high=False)
    assert pm.target.sum() == 3 and pm.weight.sum() == 5  # 3 fg, 2 bg, 1 in the band
    cfg = TrainConfig()
    assert torch.equal(pseudo_loss_weight(pm, cfg), pm.weight)  # the paper's W
    cfg.sim.pseudo_foreground = False
    w = pseudo_loss_weight(pm, cfg)
    assert w.sum() == 2 and w[0, 2, 1] == 1 and w[0, 2, 2] == 1

    logits = torch.linspace(-2.0, 2.0, 20).reshape(1, 1, 4, 5).requires_grad_()
    loss = bce_dice_loss(logits, pm.target, w)
    z_bg = logits.detach()[0, 0, 2, 1:3]
    expected = torch.nn.functional.softplus(z_bg).mean() + 1.0  # BCE(z, 0) = softplus(z)
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    grad = logits.grad[0, 0]
    assert (grad[2, 1:3] > 0).all()  # pushes the background logits down
    assert (grad[w[0] == 0] == 0).all()  # foreground labels, band and outside: no gradient

    diagnostic = pseudo_masks(mi, torch.zeros_like(mi), box, alpha=0.0, adaptive_high=False,
                              tau_high_range=(1.01, 1.01))
    torch.testing.assert_close(loss.detach(), bce_dice_loss(
        logits.detach(), diagnostic.target, diagnostic.weight))
