"""Known-answer tests of training.losses.boxinst (box masks, dice, projection, pairwise)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.losses.boxinst import (
    boxes_to_bitmasks,
    dice_coefficient,
    feature_similarity,
    pairwise_loss,
    pairwise_warmup,
    projection_loss,
)

OFFSETS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def _in_map_indicator(n: int, h: int, w: int, dilation: int = 2) -> torch.Tensor:
    """(n, 8, h, w) float: 1 where the dilated neighbour lies inside the h x w map."""
    out = torch.zeros(n, 8, h, w)
    for k, (dy, dx) in enumerate(OFFSETS):
        for y in range(h):
            for x in range(w):
                if 0 <= y + dy * dilation < h and 0 <= x + dx * dilation < w:
                    out[:, k, y, x] = 1.0
    return out


def test_boxes_to_bitmasks_hand_case() -> None:
    boxes = torch.tensor([[1.5, 2.7, 4.2, 5.0], [0.0, 0.0, 3.0, 3.0]])
    full, strided = boxes_to_bitmasks(boxes, 8, 8, stride=4)
    assert full.shape == (2, 8, 8) and strided.shape == (2, 2, 2)
    assert full.dtype == torch.float32
    # Box 0: cols int(1.5)=1 .. int(5.2)=5 exclusive -> 1..4; rows int(2.7)=2 .. int(6.0)=6 -> 2..5.
    expected0 = torch.zeros(8, 8)
    expected0[2:6, 1:5] = 1
    # Box 1: integer corners are inclusive -> rows/cols 0..3.
    expected1 = torch.zeros(8, 8)
    expected1[0:4, 0:4] = 1
    assert torch.equal(full[0], expected0)
    assert torch.equal(full[1], expected1)
    # Strided samples rows/cols 2 and 6.
    assert strided[0].tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert strided[1].tolist() == [[1.0, 0.0], [0.0, 0.0]]


def test_boxes_to_bitmasks_matches_slicing_rule_on_random_boxes() -> None:
    g = torch.Generator().manual_seed(0)
    xy1 = torch.rand(20, 2, generator=g) * torch.tensor([60.0, 40.0])
    wh = torch.rand(20, 2, generator=g) * 30
    boxes = torch.cat([xy1, (xy1 + wh).clamp(max=torch.tensor([63.0, 47.0]))], dim=1)
    full, strided = boxes_to_bitmasks(boxes, 48, 64)
    for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        ref = torch.zeros(48, 64)
        ref[int(y1) : int(y2 + 1), int(x1) : int(x2 + 1)] = 1
        assert torch.equal(full[i], ref)
        assert torch.equal(strided[i], ref[2::4, 2::4])
    empty_full, empty_strided = boxes_to_bitmasks(torch.zeros(0, 4), 8, 8)
    assert empty_full.shape == (0, 8, 8) and empty_strided.shape == (0, 2, 2)


def test_dice_coefficient_hand_computed() -> None:
    x = torch.tensor([[1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    t = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    # Row 0: 1 - 2 * 1.5 / (1.25 + 2 + 1e-5); row 1: 1 - 0 / (0 + 1 + 1e-5) = 1.
    expected = torch.tensor([1 - 3.0 / (3.25 + 1e-5), 1.0])
    torch.testing.assert_close(dice_coefficient(x, t), expected)
    torch.testing.assert_close(
        dice_coefficient(x.reshape(2, 1, 2, 2), t.reshape(2, 1, 2, 2)), expected
    )


def test_projection_loss_perfect_and_all_negative() -> None:
    _, box = boxes_to_bitmasks(torch.tensor([[8.0, 4.0, 20.0, 27.0]]), 32, 32)
    logits = torch.where(box > 0, 20.0, -20.0).unsqueeze(1).requires_grad_()
    assert projection_loss(logits, box).item() < 1e-4
    negative = torch.full_like(logits, -20.0)
    loss = projection_loss(negative, box)
    assert loss.item() > 0.5
    assert loss.item() == pytest.approx(2.0, abs=1e-3)  # both dice terms ~1


def test_projection_loss_hand_computed_and_empty() -> None:
    # 1 instance, 2x2 grid, logits 0 -> p = 0.5 everywhere; box covers the top row.
    box = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    logits = torch.zeros(1, 1, 2, 2, requires_grad=True)
    # max over y: p=[.5,.5], b=[1,1] -> 1 - 2*1/(0.5+2+eps); max over x: p=[.5,.5], b=[1,0]
    # -> 1 - 2*0.5/(0.5+1+eps).
    expected = (1 - 2.0 / (2.5 + 1e-5)) + (1 - 1.0 / (1.5 + 1e-5))
    loss = projection_loss(logits, box)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    empty = torch.zeros(0, 1, 4, 4, requires_grad=True)
    zero = projection_loss(empty, torch.zeros(0, 4, 4))
    assert zero.item() == 0.0 and zero.requires_grad
    zero.backward()


def _pairwise_reference(z: np.ndarray, s: np.ndarray, box: np.ndarray, thr: float) -> float:
    """Loop reference of the pairwise loss with probabilities (float64)."""
    n, _, h, w = z.shape
    p = 1 / (1 + np.exp(-z[:, 0].astype(np.float64)))
    num, den = 0.0, 0.0
    for i in range(n):
        for k, (dy, dx) in enumerate(OFFSETS):
            for y in range(h):
                for x in range(w):
                    yy, xx = y + 2 * dy, x + 2 * dx
                    pj = p[i, yy, xx] if 0 <= yy < h and 0 <= xx < w else None
                    wt = float(s[i, k, y, x] >= thr) * box[i, y, x]
                    if wt == 0:
                        continue
                    assert pj is not None, "test inputs never weight off-map edges"
                    same = p[i, y, x] * pj + (1 - p[i, y, x]) * (1 - pj)
                    num += -math.log(same) * wt
                    den += wt
    return num / max(den, 1.0)


def test_pairwise_loss_known_answers() -> None:
    n, h, w = 2, 8, 8
    s = _in_map_indicator(n, h, w)
    box = torch.ones(n, h, w)
    # Constant confident mask over constant colours: ~0.
    assert pairwise_loss(torch.full((n, 1, h, w), 20.0), s, box, 0.3).item() < 1e-6
    # Undecided logits 0: P_same = 0.5 on every edge -> exactly log 2.
    loss0 = pairwise_loss(torch.zeros(n, 1, h, w), s, box, 0.3)
    assert loss0.item() == pytest.approx(math.log(2), rel=1e-6)
    # One-pixel checkerboard: dilation-2 neighbours have the same parity -> ~0.
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    sign1 = 1.0 - 2.0 * ((yy + xx) % 2).float()
    assert pairwise_loss((20 * sign1).expand(n, 1, h, w), s, box, 0.3).item() < 1e-6
    # Two-pixel checkerboard of +-a: the 4 axis neighbours differ, the 4 diagonals agree.
    a = 3.0
    sign2 = 1.0 - 2.0 * ((yy // 2 + xx // 2) % 2).float()
    logits = (a * sign2).expand(n, 1, h, w).contiguous()
    sp, sn = torch.sigmoid(torch.tensor(a)).item(), torch.sigmoid(torch.tensor(-a)).item()
    loss_diff, loss_same = -math.log(2 * sp * sn), -math.log(sp * sp + sn * sn)
    axis = s[:, [1, 3, 4, 6]].sum().item()
    diag = s[:, [0, 2, 5, 7]].sum().item()
    expected = (axis * loss_diff + diag * loss_same) / (axis + diag)
    assert pairwise_loss(logits, s, box, 0.3).item() == pytest.approx(expected, rel=1e-5)


def test_pairwise_loss_matches_loop_reference_with_threshold_and_box() -> None:
    g = torch.Generator().manual_seed(3)
    n, h, w = 3, 6, 7
    z = torch.randn(n, 1, h, w, generator=g) * 4
    s = torch.rand(n, 8, h, w, generator=g) * _in_map_indicator(n, h, w)
    s[0, 0, 3, 3] = 0.3  # exactly at the threshold: counted (>=)
    _, box = boxes_to_bitmasks(torch.tensor([[2.0, 3.0, 17.0, 20.0]] * n), 4 * h, 4 * w)
    box[2] = 0  # instance without any weighted edge
    ours = pairwise_loss(z, s, box, 0.3).item()
    ref = _pairwise_reference(z.numpy(), s.numpy(), box.numpy(), 0.3)
    assert ours == pytest.approx(ref, rel=1e-5)


def test_pairwise_loss_all_weights_zero_is_zero_and_finite() -> None:
    z = torch.randn(2, 1, 4, 4, requires_grad=True)
    s = torch.zeros(2, 8, 4, 4)
    loss = pairwise_loss(z, s, torch.ones(2, 4, 4), 0.1)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(z.grad).all() and (z.grad == 0).all()
    zero = pairwise_loss(
        torch.zeros(0, 1, 4, 4, requires_grad=True),
        torch.zeros(0, 8, 4, 4),
        torch.zeros(0, 4, 4),
        0.1,
    )
    assert zero.item() == 0.0 and zero.requires_grad


def test_pairwise_loss_is_stable_for_huge_logits() -> None:
    z = torch.tensor([[-200.0, 200.0, -200.0, 200.0]]).reshape(1, 1, 1, 4).requires_grad_()
    s = torch.ones(1, 8, 1, 4)
    loss = pairwise_loss(z, s, torch.ones(1, 1, 4), 0.3)
    # Right neighbours at distance 2 share the sign -> loss 0 there; the left neighbour of
    # pixel 0 and right of pixel 3 are zero padding (log p = 0) -> also 0.
    assert torch.isfinite(loss) and loss.item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert torch.isfinite(z.grad).all()


def test_pairwise_warmup() -> None:
    assert pairwise_warmup(0, 10000) == 0.0
    assert pairwise_warmup(5000, 10000) == 0.5
    assert pairwise_warmup(20000, 10000) == 1.0
    assert pairwise_warmup(3, 0) == 1.0


def test_feature_similarity_known_distances() -> None:
    feats = torch.zeros(1, 2, 4, 4)
    feats[:, 0, :, 2:] = 3.0
    feats[:, 1, :, 2:] = 4.0  # ||(3, 4) - (0, 0)|| = 5
    sim = feature_similarity(feats)
    assert sim.shape == (1, 8, 4, 4)
    assert sim[0, 4, 1, 0].item() == pytest.approx(math.exp(-5.0), rel=1e-5)  # right nb
    assert sim[0, 6, 1, 0].item() == 1.0  # neighbour below, same features
    assert sim[0, 1, 3, 3].item() == 1.0


def test_gradients_finite_fp32_and_bf16_autocast() -> None:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 4, 8, 8, generator=g)
    conv = torch.nn.Conv2d(4, 1, 3, padding=1)
    s = torch.rand(3, 8, 8, 8, generator=g) * _in_map_indicator(3, 8, 8)
    _, box = boxes_to_bitmasks(torch.tensor([[4.0, 4.0, 20.0, 24.0]] * 3), 32, 32)
    for autocast in (False, True):
        conv.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = conv(feats)
            assert logits.dtype == (torch.bfloat16 if autocast else torch.float32)
            loss = projection_loss(logits, box) + pairwise_loss(logits, s, box, 0.3)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()
        assert torch.isfinite(conv.weight.grad).all() and conv.weight.grad.abs().sum() > 0


def test_pairwise_loss_single_pixel_map_is_zero() -> None:
    # 1x1 map: every neighbour is off the map, so the in-map similarity is 0 everywhere.
    s = _in_map_indicator(1, 1, 1)
    assert s.sum().item() == 0.0
    loss = pairwise_loss(torch.zeros(1, 1, 1, 1), s, torch.ones(1, 1, 1), 0.3)
    assert loss.item() == 0.0


def test_empty_input_loss_is_positive_zero_with_grad() -> None:
    """A loss of no instances is +0.0 (a negative logit sum times 0 would be -0.0 and log as
    "-0.000") and stays connected to the graph."""
    logits = torch.full((0, 1, 4, 4), -3.0, requires_grad=True)
    loss = projection_loss(logits, torch.zeros(0, 4, 4))
    assert loss.item() == 0.0 and math.copysign(1.0, loss.item()) == 1.0
    loss.backward()
    assert logits.grad is not None
    from training.losses.boxinst import zero_with_grad

    negative = torch.full((2, 3), -1.0, requires_grad=True)
    assert math.copysign(1.0, zero_with_grad(negative).item()) == 1.0
