"""Per-iteration losses: FCOS, the mask losses (BoxInst / fully supervised) and SIM's losses.

``compute_losses`` turns a batch, the student's outputs and (for SIM) the teacher's outputs into
a dict of named scalar losses. The order of operations follows SIM_SPEC section 7.0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from serving.model import CondInst, CondInstOutputs

from ..targets import assign_targets, mask_centers, sample_positives
from ..train_config import TrainConfig
from . import (
    boxes_to_bitmasks,
    centerness_target,
    dice_coefficient,
    fcos_losses,
    feature_similarity,
    image_color_similarity,
    pairwise_loss,
    pairwise_warmup,
    projection_loss,
    zero_with_grad,
)

ReduceMean = Callable[[Tensor], Tensor]


@dataclass
class Targets:
    """Ground truth of a padded batch, in the network-input frame.

    Attributes:
        boxes / labels: per image (M_i, 4) XYXY float and (M_i,) int64.
        box_masks: per image (M_i, H, W) float {0,1}: the box masks, or for copy-pasted and
            occluded instances their visible regions (SIM_SPEC 7.8).
        gt_masks: per image (M_i, H, W) bool instance masks (``supervision: mask`` only).
        pasted: per image (M_i,) bool, True for instances pasted this iteration.
        paste_masks: per image (M_i, H, W) bool pasted pseudo masks (valid where pasted).
    """

    boxes: list[Tensor]
    labels: list[Tensor]
    box_masks: list[Tensor]
    gt_masks: list[Tensor] | None = None
    pasted: list[Tensor] | None = None
    paste_masks: list[Tensor] | None = None


@dataclass
class Positives:
    """Sampled positive locations of the batch (flattened over images), grouped by box."""

    image_index: Tensor  # (P,) int64
    location: Tensor  # (P,) int64 index into the N locations
    gt_global: Tensor  # (P,) int64 index into the concatenated boxes of the batch
    num_gts: int
    gt_image: Tensor  # (G,) int64 image of each box
    gt_boxes: Tensor  # (G, 4)
    gt_labels: Tensor  # (G,)


@dataclass
class StepOutput:
    losses: dict[str, Tensor]
    positives: Positives
    mask_logits: Tensor  # (P, 1, H/4, W/4) student
    extras: dict[str, Tensor] = field(default_factory=dict)


def _identity(x: Tensor) -> Tensor:
    return x


def fcos_assign_batch(outputs: CondInstOutputs, targets: Targets, topk: int,
                      radius: float = 1.5) -> tuple[Tensor, Tensor, Positives]:
    """FCOS targets for every image and the mask-head positives (SIM_SPEC 3-4).

    Returns:
        labels (B, N) int64 (-1 background), reg_targets (B, N, 4) stride units, positives.
    """
    labels_all, reg_all, pos_img, pos_loc, pos_gt = [], [], [], [], []
    quality = (outputs.cls_logits.detach().sigmoid().amax(dim=-1)
               * outputs.ctrness.detach().sigmoid())  # (B, N)
    offset = 0
    for b, (boxes, labels, masks) in enumerate(zip(targets.boxes, targets.labels,
                                                   targets.box_masks)):
        centers = mask_centers(masks, boxes) if boxes.shape[0] else None
        t = assign_targets(outputs.locations, outputs.strides, outputs.levels, boxes, labels,
                           centers, radius)
        labels_all.append(t.labels)
        reg_all.append(t.reg_targets)
        keep = sample_positives(t.gt_index, quality[b], topk)
        pos_img.append(torch.full_like(keep, b))
        pos_loc.append(keep)
        pos_gt.append(t.gt_index[keep] + offset)
        offset += boxes.shape[0]
    device = outputs.locations.device
    gt_image = torch.cat([torch.full((bx.shape[0],), i, dtype=torch.int64, device=device)
                          for i, bx in enumerate(targets.boxes)])
    positives = Positives(torch.cat(pos_img), torch.cat(pos_loc), torch.cat(pos_gt), offset,
                          gt_image, torch.cat(targets.boxes), torch.cat(targets.labels))
    return torch.stack(labels_all), torch.stack(reg_all), positives


def run_mask_head(model: CondInst, outputs: CondInstOutputs, pos: Positives) -> Tensor:
    """Mask logits (P, 1, H/4, W/4) of the positives with the network's dynamic head."""
    params = model.controller_params(outputs, pos.image_index, pos.location)
    return model.mask_head(outputs.mask_feats, params,
                           outputs.locations[pos.location], outputs.levels[pos.location],
                           pos.image_index)


def bottom_removed_valid(valid: Tensor, image_sizes: list[tuple[int, int]],
                         orig_heights: list[int], pixels: int) -> Tensor:
    """The image mask with the bottom ``pixels`` original rows removed (SIM_SPEC 6.1)."""
    out = valid.clone()
    for i, ((h, _), h0) in enumerate(zip(image_sizes, orig_heights)):
        cut = int(pixels * h / max(h0, 1))
        if cut > 0:
            out[i, max(h - cut, 0):h] = False
    return out


def compute_losses(model: CondInst, outputs: CondInstOutputs, images_uint8: Tensor,
                   color_valid: Tensor, targets: Targets, cfg: TrainConfig, step: int,
                   reduce_mean: ReduceMean = _identity,
                   teacher_mask_feats: Tensor | None = None) -> StepOutput:
    """FCOS + mask losses of one batch (SIM losses are added by :mod:`training.sim.iteration`).

    Args:
        images_uint8: (B, 3, H, W) RGB 0-255 padded batch (for colour affinity).
        color_valid: (B, H, W) bool image mask with bottom pixels removed.
        step: 0-based iteration (drives the pairwise warm-up).
        reduce_mean: averages a tensor over processes (``accelerator.reduce(..., "mean")``).
        teacher_mask_feats: (B, D, H/8, W/8) the SIM teacher's mask features; needed (and only
            read) when ``boxinst.pairwise_affinity == "color_feature"``.
    """
    labels, reg_targets, pos = fcos_assign_batch(outputs, targets,
                                                 cfg.boxinst.topk_proposals_per_image,
                                                 cfg.inference.center_radius)
    flat_labels = labels.reshape(-1)
    is_pos = flat_labels >= 0
    num_pos = reduce_mean(is_pos.sum().float().detach()).clamp(min=1.0)
    ctr_sum = reduce_mean(centerness_target(reg_targets.reshape(-1, 4)[is_pos]).sum().detach())
    losses = fcos_losses(outputs.cls_logits.reshape(-1, outputs.cls_logits.shape[-1]),
                         outputs.box_reg.reshape(-1, 4), outputs.ctrness.reshape(-1),
                         flat_labels, reg_targets.reshape(-1, 4), float(num_pos),
                         max(float(ctr_sum), 1e-6))
    logits = run_mask_head(model, outputs, pos)
    h4, w4 = logits.shape[-2:]
    gt = pos.gt_global
    if cfg.supervision == "mask":
        if targets.gt_masks is None:
            raise ValueError("supervision 'mask' needs instance masks in the batch")
        gt_masks = torch.cat(targets.gt_masks)[:, 2::4, 2::4].float()
        if gt.numel():
            losses["loss_mask"] = dice_coefficient(logits[:, 0].float().sigmoid(),
                                                   gt_masks[gt]).mean()
        else:
            losses["loss_mask"] = zero_with_grad(logits)
    else:
        box_s4 = torch.cat(targets.box_masks)[:, 2::4, 2::4].float()[:, :h4, :w4]
        if cfg.boxinst.projection:
            losses["loss_prj"] = projection_loss(logits, box_s4[gt])
        if cfg.boxinst.pairwise:
            sim = image_color_similarity(images_uint8, color_valid, 4, cfg.boxinst.pairwise_size,
                                         cfg.boxinst.pairwise_dilation)
            if cfg.boxinst.pairwise_affinity == "color_feature":
                sim = sim * _teacher_feature_similarity(teacher_mask_feats, sim.shape[-2:], cfg)
            warm = pairwise_warmup(step, cfg.pairwise_warmup_iters)
            losses["loss_pairwise"] = warm * pairwise_loss(
                logits, sim[pos.image_index], box_s4[gt], cfg.boxinst.color_threshold,
                cfg.boxinst.pairwise_size, cfg.boxinst.pairwise_dilation)
    return StepOutput(losses, pos, logits)


def _teacher_feature_similarity(teacher_mask_feats: Tensor | None, size: torch.Size,
                                cfg: TrainConfig) -> Tensor:
    """(B, K, h, w) ``exp(-||f_i - f_j||)`` of the teacher's unnormalised mask features at
    stride 4 (the SIM code's ``get_feat_similarity``, SIM_SPEC 6.4)."""
    if teacher_mask_feats is None:
        raise ValueError("boxinst.pairwise_affinity='color_feature' needs the teacher's mask "
                         "features (teacher_mask_feats)")
    feats = upsample_features(teacher_mask_feats.detach().float())[..., :size[0], :size[1]]
    return feature_similarity(feats, cfg.boxinst.pairwise_size, cfg.boxinst.pairwise_dilation)


def targets_from_batch(boxes: list[Tensor], labels: list[Tensor], height: int, width: int,
                       gt_masks: list[Tensor] | None = None) -> Targets:
    """Targets with box masks rasterised by the BoxInst rule (SIM_SPEC 6.1)."""
    box_masks = [boxes_to_bitmasks(b, height, width)[0] if b.shape[0] else
                 torch.zeros((0, height, width), device=b.device) for b in boxes]
    return Targets(boxes, labels, box_masks, gt_masks)


def upsample_features(mask_feats: Tensor) -> Tensor:
    """Stride-8 mask features -> stride 4, bilinear (align_corners False; SIM_SPEC 6.4/7)."""
    return F.interpolate(mask_feats, scale_factor=2, mode="bilinear", align_corners=False)
