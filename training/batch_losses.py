"""The losses of one training batch, and the check that stops training on a NaN/inf loss.

:func:`batch_losses` is the whole forward side of an iteration (SIM_SPEC section 7.0):
copy-paste (SIM), the student's forward pass, the FCOS and mask losses, and SIM's pseudo and
paste losses. The loop in :mod:`training.train` adds backward, the optimiser step and the EMA
update; ``benchmarks/train_speed.py`` times the same function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.profiler import record_function

from serving.errors import SimError
from serving.model import CondInst

from .data.collate import Batch
from .losses.criterion import bottom_removed_valid, compute_losses, targets_from_batch
from .sim.iteration import SIMState, sim_losses
from .train_config import TrainConfig


class TrainingError(SimError):
    """Training cannot continue (NaN/inf loss, bad data)."""


def batch_losses(model: nn.Module, student: CondInst, batch: Batch, cfg: TrainConfig,
                 step: int, sim: SIMState | None,
                 reduce_mean: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    """Named scalar losses of one batch.

    Args:
        model: the student as called for the forward pass (DDP-wrapped or bare).
        student: the bare network (normalisation, mask head).
        batch: a collated batch on the training device (``batch.masks`` only in mask mode).
        step: 0-based optimiser step (drives warm-ups and SIM's start).
        sim: SIM's state, None without SIM.
        reduce_mean: averages a tensor over processes (identity on one process).
    """
    h, w = batch.images.shape[-2:]
    targets = targets_from_batch(batch.boxes, batch.labels, h, w, batch.masks)
    images = batch.images
    if sim is not None:
        with record_function("sim.copy_paste"):
            images, targets = sim.copy_paste(images, batch.valid, targets, step)
    color_valid = bottom_removed_valid(batch.valid, batch.image_sizes,
                                       [s[0] for s in batch.orig_sizes],
                                       cfg.boxinst.bottom_pixels_removed)
    x = student.normalize(images, batch.valid)
    with record_function("student.forward"):
        outputs = model(x)
    # The SIM code's colour x feature affinity reads the teacher at every step; its outputs
    # are then reused by SIM's maps instead of a second teacher forward.
    t_out = sim.teacher_forward(x) if sim is not None and \
        cfg.boxinst.pairwise_affinity == "color_feature" else None
    with record_function("losses.fcos_boxinst"):
        result = compute_losses(student, outputs, images, color_valid, targets, cfg, step,
                                reduce_mean, None if t_out is None else t_out.mask_feats)
    losses = result.losses
    if sim is not None:
        with record_function("sim.losses"):
            losses.update(sim_losses(sim, student, x, images, outputs, result, targets, cfg,
                                     step, t_out))
    return losses


def check_finite(losses: dict[str, Tensor], step: int, accelerator: Accelerator) -> None:
    """Raise :class:`TrainingError` naming the step and the losses when any loss of any
    process is NaN or infinite (every process raises, so none waits forever)."""
    bad = [name for name, v in losses.items() if not torch.isfinite(v.detach()).all()]
    flag = torch.tensor(float(len(bad)), device=accelerator.device)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, "sum")
    if float(flag) > 0:
        detail = ", ".join(f"{n}={float(losses[n].detach()):.4g}" for n in bad) or \
            "on another process"
        raise TrainingError(
            f"step {step + 1}: non-finite loss ({detail}); lower optim.lr, enable "
            "optim.clip_grad_norm, or resume from the last checkpoint with --resume auto"
        )
