"""Known-answer tests of training.losses.fcos (focal, GIoU, centerness)."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import generalized_box_iou_loss

from training.losses.fcos import centerness_target, fcos_losses, giou_loss_ltrb


def _batch(num_pos: int = 3, total: int = 10, num_classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.full((total,), -1, dtype=torch.int64)
    labels[:num_pos] = torch.randint(0, num_classes, (num_pos,), generator=g)
    reg_targets = torch.rand(total, 4, generator=g) * 5 + 0.5
    cls_logits = torch.randn(total, num_classes, generator=g, requires_grad=True)
    box_reg = (torch.rand(total, 4, generator=g) * 5 + 0.1).requires_grad_()
    ctrness = torch.randn(total, generator=g, requires_grad=True)
    return cls_logits, box_reg, ctrness, labels, reg_targets


def test_centerness_target_hand_computed() -> None:
    t = torch.tensor([[1.0, 3.0, 2.0, 2.0], [2.0, 2.0, 2.0, 2.0], [1.0, 1.0, 4.0, 9.0]])
    expected = torch.tensor([math.sqrt(1 / 3), 1.0, math.sqrt(1 / 4 * 1 / 9)])
    torch.testing.assert_close(centerness_target(t), expected)
    assert centerness_target(torch.zeros(0, 4)).shape == (0,)


def test_giou_ltrb_hand_computed_and_torchvision_equivalence() -> None:
    pred = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    target = torch.tensor([[2.0, 2.0, 2.0, 2.0]])
    # I = 4, U = 16, C = 16: smoothed IoU (4+1)/(16+1), plain IoU 1/4, no enclosure penalty.
    assert giou_loss_ltrb(pred, target).item() == pytest.approx(1 - 5 / 17, rel=1e-6)
    assert giou_loss_ltrb(pred, target, iou_smooth=0.0).item() == pytest.approx(0.75, rel=1e-6)
    # Offset boxes: pred (0, 1, 2, 1) vs target (1, 0, 1, 2): I = 1*2... computed by hand:
    # w_int = min(0,1)+min(2,1) = 1, h_int = min(1,0)+min(1,2) = 1, I = 1;
    # areas 2*2 = 4 and 2*2 = 4, U = 7; C = (1+2)*(1+2) = 9.
    p2, t2 = torch.tensor([[0.0, 1.0, 2.0, 1.0]]), torch.tensor([[1.0, 0.0, 1.0, 2.0]])
    expected = 1 - (2 / 8 - (9 - 7) / 9)
    assert giou_loss_ltrb(p2, t2).item() == pytest.approx(expected, rel=1e-6)
    g = torch.Generator().manual_seed(1)
    p = torch.rand(50, 4, generator=g) * 4 + 0.1
    t = torch.rand(50, 4, generator=g) * 4 + 0.1
    as_boxes = lambda x: torch.cat([-x[:, :2], x[:, 2:]], dim=1)  # noqa: E731
    ref = generalized_box_iou_loss(as_boxes(p), as_boxes(t), reduction="none")
    torch.testing.assert_close(giou_loss_ltrb(p, t, iou_smooth=0.0), ref, atol=1e-5, rtol=1e-5)


def test_perfect_regression_gives_zero_loc_loss() -> None:
    cls_logits, _, ctrness, labels, reg_targets = _batch()
    box_reg = reg_targets.clone().requires_grad_()
    losses = fcos_losses(cls_logits, box_reg, ctrness, labels, reg_targets, num_pos_avg=3.0)
    assert losses["loss_fcos_loc"].item() == pytest.approx(0.0, abs=1e-6)


def test_fcos_losses_hand_computed() -> None:
    # Two locations, one class: a positive and a background, all logits 0.
    cls_logits = torch.zeros(2, 1, requires_grad=True)
    labels = torch.tensor([0, -1])
    reg_targets = torch.tensor([[1.0, 3.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0]])
    box_reg = torch.tensor([[1.0, 1.0, 1.0, 1.0], [5.0, 5.0, 5.0, 5.0]], requires_grad=True)
    ctrness = torch.zeros(2, requires_grad=True)
    losses = fcos_losses(cls_logits, box_reg, ctrness, labels, reg_targets, num_pos_avg=1.0)
    # Focal at p = 0.5: alpha * 0.25 * log 2 (positive) + (1 - alpha) * 0.25 * log 2 (negative).
    assert losses["loss_fcos_cls"].item() == pytest.approx(0.25 * math.log(2), rel=1e-6)
    # BCE with a zero logit is log 2 whatever the target.
    assert losses["loss_fcos_ctr"].item() == pytest.approx(math.log(2), rel=1e-6)
    # GIoU of (1,1,1,1) vs (1,3,2,2): I = 2*2 = 4, A_p = 4, A_t = 3*5 = 15, U = 15, C = 15.
    # Weighted by ctr and divided by the same ctr -> just 1 - GIoU.
    assert losses["loss_fcos_loc"].item() == pytest.approx(1 - 5 / 16, rel=1e-6)
    # Normalisers: num_pos_avg 2 halves cls/ctr; explicit ctr_sum_avg divides loc.
    ctr = math.sqrt(1 / 3)
    other = fcos_losses(
        cls_logits, box_reg, ctrness, labels, reg_targets, num_pos_avg=2.0, ctr_sum_avg=2 * ctr
    )
    assert other["loss_fcos_cls"].item() == pytest.approx(0.125 * math.log(2), rel=1e-6)
    assert other["loss_fcos_ctr"].item() == pytest.approx(0.5 * math.log(2), rel=1e-6)
    assert other["loss_fcos_loc"].item() == pytest.approx(0.5 * (1 - 5 / 16), rel=1e-6)
    # num_pos_avg below 1 is clamped to 1.
    clamped = fcos_losses(cls_logits, box_reg, ctrness, labels, reg_targets, num_pos_avg=0.0)
    assert clamped["loss_fcos_cls"].item() == pytest.approx(0.25 * math.log(2), rel=1e-6)


def test_focal_matches_formula_on_random_batch() -> None:
    cls_logits, box_reg, ctrness, labels, reg_targets = _batch(num_pos=4, total=12)
    losses = fcos_losses(cls_logits, box_reg, ctrness, labels, reg_targets, num_pos_avg=4.0)
    target = torch.zeros_like(cls_logits)
    target[torch.arange(4), labels[:4]] = 1
    p = cls_logits.sigmoid()
    p_t = p * target + (1 - p) * (1 - target)
    alpha_t = 0.25 * target + 0.75 * (1 - target)
    ce = -torch.log(p_t)
    expected = (alpha_t * (1 - p_t) ** 2 * ce).sum() / 4
    assert losses["loss_fcos_cls"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_no_positives_gives_zero_losses_with_grad() -> None:
    cls_logits, box_reg, ctrness, labels, reg_targets = _batch(num_pos=0)
    losses = fcos_losses(cls_logits, box_reg, ctrness, labels, reg_targets, num_pos_avg=0.0)
    assert losses["loss_fcos_loc"].item() == 0.0 and losses["loss_fcos_ctr"].item() == 0.0
    assert all(v.requires_grad and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for t in (cls_logits, box_reg, ctrness):
        assert t.grad is not None and torch.isfinite(t.grad).all()
    assert (box_reg.grad == 0).all() and (ctrness.grad == 0).all()


def test_gradients_finite_fp32_and_bf16_autocast() -> None:
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(10, 8, generator=g)
    head = torch.nn.Linear(8, 4 + 4 + 1)
    _, _, _, labels, reg_targets = _batch()
    for autocast in (False, True):
        head.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = head(feats)
            cls_logits, box_reg, ctrness = out[:, :4], torch.relu(out[:, 4:8]) + 0.1, out[:, 8]
            losses = fcos_losses(cls_logits, box_reg, ctrness, labels, reg_targets, 3.0)
        total = sum(losses.values())
        assert total.dtype == torch.float32 and torch.isfinite(total)
        total.backward()
        assert torch.isfinite(head.weight.grad).all() and head.weight.grad.abs().sum() > 0
