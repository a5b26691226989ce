"""Known-answer tests of training.losses.mask.bce_dice_loss."""

from __future__ import annotations

import math

import pytest
import torch

from training.losses.mask import bce_dice_loss


def test_hand_computed_zero_logits() -> None:
    logits = torch.zeros(2, 1, 4, 4, requires_grad=True)
    target = torch.ones(2, 4, 4)
    # BCE at p = 0.5 is log 2; dice: 1 - 2 * 0.5n / (0.25n + n + eps) = 0.2 (n = 16).
    expected = math.log(2) + 1 - 16 / (20 + 1e-5)
    loss = bce_dice_loss(logits, target)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_perfect_prediction_is_near_zero() -> None:
    target = torch.zeros(3, 8, 8)
    target[:, 2:6, 1:5] = 1
    logits = torch.where(target > 0, 20.0, -20.0).unsqueeze(1)
    assert bce_dice_loss(logits, target).item() < 1e-5
    assert bce_dice_loss(logits, target, torch.ones_like(target)).item() < 1e-5


def test_weight_restricts_both_terms() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 6, 6, generator=g)
    target = (torch.rand(2, 6, 6, generator=g) > 0.5).float()
    weight = torch.zeros(2, 6, 6)
    weight[:, 1:5, 1:4] = 1
    base = bce_dice_loss(logits, target, weight)
    # Changing logits or targets where the weight is 0 leaves the loss unchanged.
    changed_logits = torch.where(weight[:, None] > 0, logits, torch.tensor(7.0))
    changed_target = torch.where(weight > 0, target, 1 - target)
    assert bce_dice_loss(changed_logits, changed_target, weight).item() == pytest.approx(
        base.item(), rel=1e-6
    )
    # Explicit formula.
    p = logits[:, 0].sigmoid()
    bce = -(target * torch.log(p) + (1 - target) * torch.log(1 - p))
    expected_bce = (bce * weight).sum() / weight.sum()
    x, t = (p * weight).flatten(1), (target * weight).flatten(1)
    dice = 1 - 2 * (x * t).sum(1) / ((x * x).sum(1) + (t * t).sum(1) + 1e-5)
    assert base.item() == pytest.approx((expected_bce + dice.mean()).item(), rel=1e-5)
    # Bool weights are accepted.
    assert bce_dice_loss(logits, target, weight > 0).item() == pytest.approx(base.item())


def test_instances_without_weight_are_left_out_of_the_dice_mean() -> None:
    logits = torch.zeros(2, 1, 4, 4)
    target = torch.ones(2, 4, 4)
    weight = torch.ones(2, 4, 4)
    weight[1] = 0
    one = bce_dice_loss(logits[:1], target[:1], weight[:1])
    both = bce_dice_loss(logits, target, weight)
    assert both.item() == pytest.approx(one.item(), rel=1e-6)


def test_all_zero_weight_and_empty_are_zero_with_grad() -> None:
    logits = torch.randn(2, 1, 4, 4, requires_grad=True)
    loss = bce_dice_loss(logits, torch.ones(2, 4, 4), torch.zeros(2, 4, 4))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    empty = torch.zeros(0, 1, 4, 4, requires_grad=True)
    zero = bce_dice_loss(empty, torch.zeros(0, 4, 4), None)
    assert zero.item() == 0.0 and zero.requires_grad


def test_bf16_autocast_gradients_finite() -> None:
    conv = torch.nn.Conv2d(3, 1, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    target = torch.zeros(2, 8, 8)
    target[:, 2:6, 2:6] = 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(x)
        assert logits.dtype == torch.bfloat16
        loss = bce_dice_loss(logits, target, torch.ones_like(target))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(conv.weight.grad).all()


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        bce_dice_loss(torch.zeros(2, 1, 4, 4), torch.zeros(2, 4, 5))
