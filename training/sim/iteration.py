"""SIM's part of a training iteration: teacher, M_I / M_S, pseudo and paste losses, prototype
and memory-bank updates, and online copy-paste (SIM_SPEC section 7, "Our decisions").

The instance map M_I reuses ``serving.inference.assign.iou_weights`` /
``weighted_instance_map``, the
code box-prompted inference runs, so self-correction and prompting are one mechanism.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.profiler import record_function

from serving.inference.assign import iou_weights, weighted_instance_map
from serving.model import CondInst
from serving.model.ops import decode_boxes

from ..data.collate import derive_seed
from ..losses import bce_dice_loss, zero_with_grad
from ..losses.criterion import Positives, StepOutput, Targets, upsample_features
from ..train_config import TrainConfig
from . import EMATeacher, MemoryBank, PrototypeMemory, paste
from .pseudo import PseudoMask, full_resolution_masks, instance_importance, pseudo_masks

#: Pixels used per step for the prototype update (a deterministic subsample above this).
MAX_PROTOTYPE_PIXELS = 32768


class SIMState:
    """Teacher, prototypes and memory bank of one run (all saved with the training state)."""

    def __init__(self, model: CondInst, cfg: TrainConfig, device: torch.device,
                 process_index: int = 0,
                 all_reduce_sum: Callable[[Tensor], Tensor] | None = None) -> None:
        self.cfg = cfg
        self.teacher = EMATeacher(model.to(device))
        self.prototypes = PrototypeMemory(
            cfg.model.num_classes, cfg.sim.num_prototypes, cfg.model.mask_channels,
            momentum=cfg.prototype_momentum, tau=cfg.sim.tau,
            epsilon=cfg.sim.sinkhorn_epsilon, sinkhorn_iters=cfg.sim.sinkhorn_iters,
            seed=cfg.seed).to(device)
        self.bank = MemoryBank(cfg.sim.memory_size)
        self.process_index = process_index
        self.all_reduce_sum = all_reduce_sum
        self.last_maps: dict[str, Tensor] = {}

    def state_dict(self) -> dict[str, Any]:
        """Teacher weights and prototypes: tensors only, the same on every process. (The
        memory bank, ``self.bank``, differs per process and is saved on its own.)"""
        return {"teacher": self.teacher.state_dict(), "prototypes": self.prototypes.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.prototypes.load_state_dict(state["prototypes"])

    def active(self, step: int) -> bool:
        return step >= self.cfg.sim_start_iter

    # ------------------------------------------------------------------ copy-paste
    def copy_paste(self, images: Tensor, valid: Tensor, targets: Targets,
                   step: int) -> tuple[Tensor, Targets]:
        """Paste instances from the memory bank onto every image of the batch (SIM_SPEC 7.8)."""
        sim = self.cfg.sim
        device = images.device
        none_pasted = [torch.zeros(b.shape[0], dtype=torch.bool, device=device)
                       for b in targets.boxes]
        targets.pasted = none_pasted
        targets.paste_masks = [torch.zeros_like(m, dtype=torch.bool) for m in targets.box_masks]
        if not (sim.copy_paste and self.active(step) and len(self.bank) >= sim.paste_min_bank):
            return images, targets
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, step, self.process_index))
        if float(torch.rand((), generator=gen)) >= sim.paste_prob:
            return images, targets
        out_images = images.clone()
        boxes, labels, masks, pasted, paste_masks = [], [], [], [], []
        for b in range(images.shape[0]):
            res = paste(images[b], valid[b], targets.boxes[b], targets.labels[b],
                        targets.box_masks[b] > 0, self.bank, gen, fraction=sim.paste_fraction,
                        min_n=sim.paste_min, max_n=sim.paste_max)
            out_images[b] = res.image.to(device)
            boxes.append(res.boxes.to(device))
            labels.append(res.labels.to(device))
            masks.append(res.box_masks_full.to(device).float())
            pasted.append(res.pasted.to(device))
            paste_masks.append(res.paste_targets.to(device))
        return out_images, Targets(boxes, labels, masks, targets.gt_masks, pasted, paste_masks)

    def teacher_forward(self, x: Tensor) -> Any:
        """The teacher's outputs (no gradient) on the student's normalised input ``x``."""
        with record_function("sim.teacher_forward"):
            return self.teacher(x, with_classes=False)  # M_I needs no class scores

    def after_step(self, student: CondInst) -> None:
        with record_function("sim.ema_update"):
            self.teacher.update(student, self.cfg.teacher_momentum)

    def log_images(self, accelerator: Any, step: int) -> None:
        """Write M_S, M_I and the pseudo mask of a few instances to tensorboard."""
        if not self.last_maps:
            return
        try:
            writer = accelerator.get_tracker("tensorboard", unwrap=True)
        except Exception:  # noqa: BLE001 - no tracker configured
            return
        grid = torch.cat([self.last_maps[k] for k in ("box", "m_sem", "m_inst", "target")],
                         dim=2)  # (n, h, 4w): the four maps side by side per instance
        writer.add_images("sim/box_ms_mi_pseudo", grid[:, None].clamp(0, 1), step)


def group_by_gt(values: Tensor, gt: Tensor, num_gts: int) -> tuple[Tensor, Tensor]:
    """Scatter (P, ...) rows, sorted by ``gt``, into (G, K, ...) with a (G, K) valid mask."""
    counts = torch.bincount(gt, minlength=num_gts)
    k = max(int(counts.max()) if counts.numel() else 0, 1)
    first = torch.searchsorted(gt, gt)
    slot = torch.arange(gt.numel(), device=gt.device) - first
    out = values.new_zeros((num_gts, k, *values.shape[1:]))
    valid = torch.zeros((num_gts, k), dtype=torch.bool, device=gt.device)
    out[gt, slot] = values
    valid[gt, slot] = True
    return out, valid


def _instance_maps(teacher: CondInst, t_out: Any, pos: Positives, mu: float) -> Tensor:
    """M_I (G, h, w): IoU-weighted mean of the teacher's masks at each box's positives."""
    params = teacher.controller_params(t_out, pos.image_index, pos.location)
    logits = teacher.mask_head(t_out.mask_feats, params,
                               t_out.locations[pos.location], t_out.levels[pos.location],
                               pos.image_index)
    probs = logits[:, 0].float().sigmoid()  # (P, h, w)
    loc = pos.location
    boxes = decode_boxes(t_out.locations[loc], t_out.box_reg[pos.image_index, loc].float(),
                         t_out.strides[loc])
    probs_g, valid = group_by_gt(probs, pos.gt_global, pos.num_gts)
    boxes_g, _ = group_by_gt(boxes, pos.gt_global, pos.num_gts)
    weights = iou_weights(boxes_g, pos.gt_boxes.float(), valid, mu)
    return weighted_instance_map(probs_g, weights)


class SIMMaps(NamedTuple):
    """SIM's per-box maps on the stride-4 grid ``(h, w)`` of the padded batch (G boxes).

    Attributes:
        m_inst: (G, h, w) M_I, the teacher's IoU-weighted instance map.
        m_sem: (G, h, w) M_S, the prototype semantic map of the box's class.
        box_s4: (G, h, w) float {0, 1} box (or visible-region) masks.
        box_full: (G, H, W) the same at input resolution.
        pseudo: the blended map, thresholds, target M_hat and weight W.
    """

    m_inst: Tensor
    m_sem: Tensor
    box_s4: Tensor
    box_full: Tensor
    pseudo: PseudoMask


@torch.no_grad()
def compute_sim_maps(sim: SIMState, x: Tensor, pos: Positives, targets: Targets,
                     cfg: TrainConfig, teacher_out: Any = None) -> SIMMaps:
    """Teacher forward, M_I, M_S and the pseudo masks of every box of a batch (SIM_SPEC 7.3-7.6).

    Args:
        x: (B, 3, H, W) normalised padded batch (the student's input).
        pos: the student's sampled positives (their locations index the teacher's outputs).
        teacher_out: the teacher's outputs on ``x`` if this step already ran it
            (:meth:`SIMState.teacher_forward`); run here otherwise.
    """
    teacher = sim.teacher.module
    t_out = teacher_out if teacher_out is not None else sim.teacher_forward(x)
    with record_function("sim.instance_map"):
        m_inst = _instance_maps(teacher, t_out, pos, cfg.sim.mu)  # (G, h, w)
    h, w = m_inst.shape[-2:]
    with record_function("sim.semantic_map"):
        feats_t = upsample_features(t_out.mask_feats.float())  # (B, D, h, w) teacher Z'
        m_sem = sim.prototypes.semantic_map(feats_t, pos.gt_labels, pos.gt_image)
    with record_function("sim.pseudo_masks"):
        box_full = torch.cat(targets.box_masks)  # (G, H, W)
        box_s4 = box_full[:, 2::4, 2::4][:, :h, :w]
        pm = pseudo_masks(m_inst, m_sem, box_s4, cfg.sim.alpha, cfg.sim.tau_low,
                          cfg.sim.tau_high_range)
    return SIMMaps(m_inst, m_sem, box_s4, box_full, pm)


def pseudo_loss_weight(pm: PseudoMask, cfg: TrainConfig) -> Tensor:
    """W of the pseudo loss, ``(G, h, w)``: SIM's (foreground and confident background) or,
    with ``sim.pseudo_foreground=false``, the confident-background pixels only."""
    if cfg.sim.pseudo_foreground:
        return pm.weight
    return pm.weight * (1.0 - pm.target)


def sim_losses(sim: SIMState, model: CondInst, x: Tensor, images_uint8: Tensor, outputs: Any,
               result: StepOutput, targets: Targets, cfg: TrainConfig,
               step: int, teacher_out: Any = None) -> dict[str, Tensor]:
    """Pseudo loss (lambda1) and paste loss (lambda2) of the step; updates prototypes and bank.

    ``teacher_out``: the teacher's outputs on ``x`` when the step already ran it.
    """
    logits = result.mask_logits
    zero = zero_with_grad(logits)
    losses = {}
    if cfg.sim.pseudo_loss:
        losses["loss_pseudo"] = zero
    if cfg.sim.copy_paste:
        losses["loss_paste"] = zero
    if not sim.active(step) or not (cfg.sim.pseudo_loss or cfg.sim.copy_paste):
        return losses
    pos = result.positives
    m_inst, m_sem, box_s4, box_full, pm = compute_sim_maps(sim, x, pos, targets, cfg,
                                                           teacher_out)
    h, w = m_inst.shape[-2:]
    pasted = torch.cat(targets.pasted) if targets.pasted is not None else \
        torch.zeros(pos.num_gts, dtype=torch.bool, device=logits.device)
    gt = pos.gt_global
    own = ~pasted[gt]
    with record_function("sim.pseudo_paste_losses"):
        if cfg.sim.pseudo_loss and bool(own.any()):
            losses["loss_pseudo"] = cfg.sim.lambda_pseudo * bce_dice_loss(
                logits[own], pm.target[gt[own]], pseudo_loss_weight(pm, cfg)[gt[own]])
        if cfg.sim.copy_paste and targets.paste_masks is not None and bool((~own).any()):
            paste_s4 = torch.cat(targets.paste_masks)[:, 2::4, 2::4][:, :h, :w].float()
            losses["loss_paste"] = cfg.sim.lambda_paste * bce_dice_loss(
                logits[~own], paste_s4[gt[~own]])
    has_pos = torch.bincount(gt, minlength=pos.num_gts) > 0
    usable = has_pos & ~pasted  # instances whose pseudo masks we trust for memory
    with record_function("sim.prototype_update"):
        _update_prototypes(sim, outputs, pos, m_inst, pm.target, box_s4, usable, step)
    if cfg.sim.copy_paste:
        with record_function("sim.bank_push"):
            _push_bank(sim, images_uint8, pos, pm, m_inst, box_full, usable)
    sim.last_maps = {"box": box_s4[:4].float(), "m_sem": m_sem[:4], "m_inst": m_inst[:4],
                     "target": pm.target[:4]}
    return losses


@torch.no_grad()
def _update_prototypes(sim: SIMState, outputs: Any, pos: Positives, m_inst: Tensor,
                       target: Tensor, box_s4: Tensor, usable: Tensor, step: int) -> None:
    """Pixels believed to be the object feed their class's prototypes (SIM_SPEC 7.7): M_I > 0.7
    inside the box (the code; ``sim.prototype_pixels="instance"``) or the pseudo mask M_hat
    (the paper; ``"pseudo"``)."""
    if sim.cfg.sim.prototype_pixels == "pseudo":
        fg = target > 0
    else:
        fg = m_inst > sim.cfg.sim.prototype_pixel_threshold
    sel = fg & (box_s4 > 0) & usable[:, None, None]
    g, ys, xs = torch.nonzero(sel, as_tuple=True)
    if g.numel() > MAX_PROTOTYPE_PIXELS:
        gen = torch.Generator().manual_seed(derive_seed(sim.cfg.seed, step, 7))
        keep = torch.randperm(g.numel(), generator=gen)[:MAX_PROTOTYPE_PIXELS].to(g.device)
        g, ys, xs = g[keep], ys[keep], xs[keep]
    feats = upsample_features(outputs.mask_feats.detach().float())  # student Z (B, D, h, w)
    pixels = feats[pos.gt_image[g], :, ys, xs]  # (n, D)
    sim.prototypes.update(pixels, pos.gt_labels[g], all_reduce_sum=sim.all_reduce_sum)


@torch.no_grad()
def _push_bank(sim: SIMState, images_uint8: Tensor, pos: Positives, pm: Any, m_inst: Tensor,
               box_full: Tensor, usable: Tensor) -> None:
    """One memory-bank entry per image: its trusted pseudo masks at input resolution.

    Only the ``usable`` instances can be stored, so only theirs are upsampled (per-instance
    operations: the same masks and scores as computing all of them).
    """
    cand = torch.nonzero(usable)[:, 0]
    if cand.numel() == 0:
        return
    masks_full = full_resolution_masks(pm.blended[cand], pm.tau_high[cand], box_full[cand])
    scores = instance_importance(m_inst, pm.target)[cand]  # (reductions over all rows: as before)
    nonempty = masks_full.flatten(1).any(dim=1)
    image, boxes, labels = pos.gt_image[cand], pos.gt_boxes[cand], pos.gt_labels[cand]
    for b in range(images_uint8.shape[0]):
        keep = (image == b) & nonempty
        if bool(keep.any()):
            sim.bank.push(images_uint8[b].cpu(), masks_full[keep].cpu(), boxes[keep].cpu(),
                          labels[keep].cpu(), scores[keep].cpu())
