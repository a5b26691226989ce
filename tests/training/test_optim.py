"""Optimiser parameter groups and the warm-up + multi-step learning-rate schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from serving import ModelConfig
from serving.model import build_condinst
from serving.model.heads import Scale
from training.optim import build_optimizer, build_scheduler, lr_factor
from training.train_config import OptimConfig

SCHEDULE = OptimConfig(lr=0.01, warmup_iters=4, warmup_factor=0.001, steps=(6, 8), gamma=0.1)
# Warm-up: factor(s) = 0.001 * (1 - s/4) + s/4 for s < 4; then 0.1 ** (milestones passed).
EXPECTED = [0.001, 0.25075, 0.5005, 0.75025, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01]


def test_lr_factor_hand_values() -> None:
    got = [lr_factor(step, SCHEDULE) for step in range(10)]
    assert got == pytest.approx(EXPECTED, rel=1e-12)


def test_warmup_and_milestone_combine() -> None:
    # A milestone inside the warm-up multiplies the warm-up ramp.
    cfg = OptimConfig(warmup_iters=10, warmup_factor=0.0, steps=(4,), gamma=0.5)
    assert lr_factor(2, cfg) == pytest.approx(0.2)
    assert lr_factor(5, cfg) == pytest.approx(0.5 * 0.5)
    assert lr_factor(10, cfg) == pytest.approx(0.5)
    # No warm-up: the first step already runs at the base rate.
    assert lr_factor(0, OptimConfig(warmup_iters=0, steps=(3,))) == 1.0


def test_scheduler_follows_lr_factor() -> None:
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=SCHEDULE.lr)
    sched = build_scheduler(opt, SCHEDULE)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([SCHEDULE.lr * f for f in EXPECTED], rel=1e-12)


def _tiny_model() -> nn.Module:
    cfg = ModelConfig(backbone="mobilenet_v2", num_classes=3, fpn_channels=32, head_convs=1,
                      mask_branch_channels=16, mask_branch_convs=1)
    return build_condinst(cfg)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_parameter_groups(kind: str) -> None:
    model = _tiny_model()
    cfg = OptimConfig(optimizer=kind, lr=0.02, weight_decay=1e-4, weight_decay_norm=0.0)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW if kind == "adamw" else torch.optim.SGD)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert all(g["lr"] == 0.02 for g in opt.param_groups)
    if kind == "sgd":
        assert all(g["momentum"] == 0.9 for g in opt.param_groups)

    norm_params = {id(p) for m in model.modules()
                   if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm))
                   for p in m.parameters(recurse=False) if p.requires_grad}
    scales = [m.scale for m in model.modules() if isinstance(m, Scale)]
    assert len(scales) == 5  # one per pyramid level
    assert norm_params, "the tiny model has normalisation layers"
    expected_no_decay = norm_params | {id(p) for p in scales}
    assert {id(p) for p in no_decay["params"]} == expected_no_decay
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in decay["params"]} == trainable - expected_no_decay
    # Each trainable parameter exactly once; frozen ones (freeze_at=2 backbone blocks) never.
    listed = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(listed) == len(set(listed)) == len(trainable)
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    assert frozen and not frozen & set(listed)


def test_frozen_parameters_are_excluded() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 1))
    model[0].requires_grad_(False)
    model[1].weight.requires_grad_(False)
    decay, no_decay = build_optimizer(model, OptimConfig()).param_groups
    assert [p is q for p, q in zip(decay["params"], [model[2].weight, model[2].bias])] == \
        [True, True]
    assert len(decay["params"]) == 2
    assert len(no_decay["params"]) == 1 and no_decay["params"][0] is model[1].bias
