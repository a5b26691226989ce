"""Momentum (EMA) teacher of SIM (SIM_SPEC 7.1).

``theta_t <- m * theta_t + (1 - m) * theta_s`` for every parameter, every iteration, with
``m = 0.9999``; buffers (BN running statistics, FrozenBN constants) are copied from the
student. Deviations from the authors' code, per "Our decisions" and SIM_SPEC section 12:

- The teacher is a deep copy of the student at construction (item 1; the code started the
  teacher's FPN and heads from their own random initialisation).
- The teacher runs under ``torch.no_grad`` (item 19; the code built an autograd graph).
  ``no_grad`` rather than ``inference_mode``: teacher outputs feed the student's losses as
  targets, and inference tensors cannot be saved for backward.
- By default the teacher runs in **eval mode**, so its BatchNorm layers normalise with the
  running statistics copied from the student and its output does not depend on the batch
  composition. The code ran the teacher in train mode (batch statistics); ``train_mode=True``
  reproduces that.

It is a plain object, not an ``nn.Module``, so the student's ``.train()``/``.parameters()``/DDP
wrapping never reach it. Parameters and buffers are matched by name.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["EMATeacher", "ema_step", "unwrap_model"]

TEACHER_MOMENTUM = 0.9999  # SIM_SPEC 7.1 (paper and code)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module inside DDP / DataParallel (``.module``) and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


@torch.no_grad()
def ema_step(t_params: list[Tensor], s_params: list[Tensor], t_bufs: list[Tensor],
             s_bufs: list[Tensor], m: float, fused: bool) -> None:
    """``t <- t * m + (1 - m) * s`` for the parameter lists, ``t <- s`` for the buffer lists.

    ``fused`` uses multi-tensor calls (``torch._foreach_*``: a few fused kernels on CUDA instead
    of hundreds of small launches); otherwise a per-tensor loop, which is faster on the CPU
    (each tensor stays in cache between the multiply and the add). Same values either way.
    """
    if fused:
        if t_params:
            torch._foreach_mul_(t_params, m)
            torch._foreach_add_(t_params, s_params, alpha=1.0 - m)
        if t_bufs:
            torch._foreach_copy_(t_bufs, s_bufs)
        return
    for t, s in zip(t_params, s_params, strict=True):
        t.mul_(m).add_(s, alpha=1.0 - m)
    for t, s in zip(t_bufs, s_bufs, strict=True):
        t.copy_(s)


class EMATeacher:
    """Exponential-moving-average copy of a student network (SIM_SPEC 7.1).

    Args:
        student: the student, possibly wrapped by DDP or ``torch.compile``; deep-copied.
        momentum: default EMA momentum ``m`` (0.9999).
        train_mode: run the teacher in train mode (BN batch statistics, the code's behaviour)
            instead of eval mode (default).

    Attributes:
        module: the teacher network (``requires_grad`` False on every parameter).
    """

    def __init__(self, student: nn.Module, momentum: float = TEACHER_MOMENTUM,
                 train_mode: bool = False) -> None:
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.module: nn.Module = copy.deepcopy(unwrap_model(student))
        self.module.requires_grad_(False)
        self.momentum = momentum
        self.train_mode = train_mode
        self.module.train(train_mode)

    def _pairs(self, student: nn.Module) -> tuple[list[Tensor], list[Tensor], list[Tensor],
                                                   list[Tensor]]:
        s = unwrap_model(student)
        sp, tp = dict(s.named_parameters()), dict(self.module.named_parameters())
        sb, tb = dict(s.named_buffers()), dict(self.module.named_buffers())
        if sp.keys() != tp.keys() or sb.keys() != tb.keys():
            raise ValueError("student and teacher have different parameter/buffer names")
        return ([tp[k] for k in tp], [sp[k] for k in tp], [tb[k] for k in tb],
                [sb[k] for k in tb])

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float | None = None) -> None:
        """``t <- m t + (1 - m) s`` for parameters, ``t <- s`` for buffers (SIM_SPEC 7.1).

        Called after the loss computation of a step (the code updates with the student's
        weights before the optimizer step; either order is a valid mean teacher).

        Args:
            student: the student (wrapped or not), same architecture as the teacher.
            momentum: overrides the default momentum for this call.
        """
        m = self.momentum if momentum is None else momentum
        t_params, s_params, t_bufs, s_bufs = self._pairs(student)
        t_float, s_float = [], []
        for t, s in zip(t_params, s_params, strict=True):
            if t.dtype.is_floating_point:
                t_float.append(t)
                s_float.append(s.detach().to(t.dtype))
            else:
                t.copy_(s)
        fused = bool(t_float) and t_float[0].is_cuda
        ema_step(t_float, s_float, t_bufs, [s.detach() for s in s_bufs], m, fused=fused)

    @torch.no_grad()
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the teacher without gradient, in the configured mode."""
        self.module.train(self.train_mode)
        return self.module(*args, **kwargs)

    __call__ = forward

    def state_dict(self) -> dict[str, Tensor]:
        """The teacher module's ``state_dict`` (same keys as the bare student's)."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Tensor], strict: bool = True) -> None:
        """Restore the teacher weights saved by :meth:`state_dict`."""
        self.module.load_state_dict(state, strict=strict)

    def to(self, *args: Any, **kwargs: Any) -> EMATeacher:
        """Move the teacher like ``nn.Module.to``; returns ``self``."""
        self.module.to(*args, **kwargs)
        return self
