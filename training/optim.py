"""Optimiser with detectron2's parameter groups and the warm-up + multi-step schedule."""

from __future__ import annotations

import torch
from torch import nn

from .train_config import OptimConfig

_NORM_TYPES = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.SyncBatchNorm)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD (momentum 0.9, wd 1e-4) or AdamW; no weight decay on normalisation layers, frozen
    parameters excluded (SIM_SPEC section 9)."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            if isinstance(module, _NORM_TYPES) or (name == "scale" and param.ndim == 0):
                no_decay.append(param)
            else:
                decay.append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": cfg.weight_decay_norm},
    ]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def lr_factor(step: int, cfg: OptimConfig) -> float:
    """Multiplier of the base lr at ``step``: linear warm-up from ``warmup_factor``, then
    ``gamma ** (number of milestones passed)``."""
    factor = cfg.gamma ** sum(step >= s for s in cfg.steps)
    if step < cfg.warmup_iters:
        alpha = step / cfg.warmup_iters
        factor *= cfg.warmup_factor * (1 - alpha) + alpha
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer,
                    cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
