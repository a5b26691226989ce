"""The one post-processing implementation: automatic detection and box-prompted masks.

Used by the ``Segmenter`` torch backend, by training's evaluation and (through the same
functions) by the export wrapper. Steps follow SIM_SPEC section 5:

1. ``p = sigmoid(cls) * sigmoid(ctr)``, candidates ``p > score_threshold``, at most
   ``pre_nms_topk`` per level; boxes decoded from the location; score ``sqrt(p)``.
2. Class-aware NMS at IoU 0.6, top ``max_detections`` per image.
3. Dynamic mask head on the kept detections -> probabilities at stride 4.
4. :func:`postprocess_masks`: aligned x4 upsampling to the padded input, crop to the resized
   image, bilinear resize to the original size, threshold 0.5.

Box-prompted mode (:func:`segment_boxes`) takes, for each prompt box, the FCOS locations that
training would assign to it and averages their masks with weights ``exp(mu * IoU)`` (the
paper's M_I, Eq. 6).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms

from .assign import iou_weights, prompt_locations, weighted_instance_map
from .config import InferenceConfig
from .model.condinst import CondInst, CondInstOutputs
from .model.ops import aligned_bilinear, decode_boxes


class Detections(NamedTuple):
    """Detections of one image, in the network-input frame.

    Attributes:
        boxes: (K, 4) float XYXY input pixels, clipped to the resized image.
        scores: (K,) float in [0, 1], sorted descending.
        labels: (K,) int64 class indices.
        mask_probs: (K, H/4, W/4) float mask probabilities at stride 4 of the padded input.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    mask_probs: Tensor


class PromptDetections(NamedTuple):
    """Box-prompted results for a batch, one row per prompt box in input order.

    Attributes:
        mask_probs: (B, M, H/4, W/4) float M_I probabilities at stride 4 of the padded input.
        scores: (B, M) float IoU-weighted mean detection score of the box's locations.
        labels: (B, M) int64: the given class, or the predicted one where none was given.
    """

    mask_probs: Tensor
    scores: Tensor
    labels: Tensor


def level_topk_candidates(probs: Tensor, levels: Tensor, num_levels: int,
                          topk: int) -> tuple[Tensor, Tensor]:
    """Top-``topk`` (location, class) pairs of each level, as fixed-shape tensors.

    Args:
        probs: (N, C) candidate scores; levels: (N,) level of each location.

    Returns:
        scores (L*k,) and flat indices (L*k,) into ``probs.flatten()``; k = min(topk, N*C).
    """
    n, c = probs.shape
    per_level = torch.stack([probs * (levels == lvl)[:, None] for lvl in range(num_levels)])
    k = min(topk, n * c)
    scores, index = per_level.reshape(num_levels, n * c).topk(k, dim=1)  # (L, k)
    return scores.reshape(-1), index.reshape(-1)


def detect(model: CondInst, outputs: CondInstOutputs, image_sizes: Tensor,
           cfg: InferenceConfig) -> list[Detections]:
    """Automatic instance segmentation of a batch.

    Args:
        model: the network (its ``mask_head`` is run on the kept detections).
        outputs: ``model(images)``.
        image_sizes: (B, 2) int (height, width) of each resized image before padding.
        cfg: thresholds and limits.
    """
    num_levels = len(model.strides)
    cls_prob = outputs.cls_logits.sigmoid()
    ctr_prob = outputs.ctrness.sigmoid()
    num_classes = cls_prob.shape[-1]
    kept_boxes, kept_scores, kept_labels, kept_locs, kept_img = [], [], [], [], []
    for b in range(cls_prob.shape[0]):  # loop over images; everything inside is vectorised
        probs = cls_prob[b] * ctr_prob[b][:, None]  # (N, C)
        scores, flat = level_topk_candidates(probs, outputs.levels, num_levels, cfg.pre_nms_topk)
        keep = scores > cfg.score_threshold
        scores, flat = scores[keep], flat[keep]
        loc, label = flat // num_classes, flat % num_classes
        boxes = decode_boxes(outputs.locations[loc], outputs.box_reg[b, loc], outputs.strides[loc])
        h, w = image_sizes[b, 0].to(boxes.dtype), image_sizes[b, 1].to(boxes.dtype)
        boxes = torch.stack((boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h),
                             boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)), dim=1)
        nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, scores, loc, label = boxes[nonempty], scores[nonempty], loc[nonempty], label[
            nonempty]
        scores = scores.sqrt()
        keep = batched_nms(boxes.float(), scores.float(), label, cfg.nms_threshold)
        keep = keep[: cfg.max_detections]
        kept_boxes.append(boxes[keep])
        kept_scores.append(scores[keep])
        kept_labels.append(label[keep])
        kept_locs.append(loc[keep])
        kept_img.append(torch.full_like(keep, b))
    loc = torch.cat(kept_locs)
    logits = model.mask_head(outputs.mask_feats, outputs.controller[torch.cat(kept_img), loc],
                             outputs.locations[loc], outputs.levels[loc], torch.cat(kept_img))
    probs_all = logits[:, 0].sigmoid().split([len(k) for k in kept_locs])
    return [Detections(bx, sc, lb, mp) for bx, sc, lb, mp in
            zip(kept_boxes, kept_scores, kept_labels, probs_all)]


def segment_boxes(model: CondInst, outputs: CondInstOutputs, boxes: Tensor,
                  labels: Tensor | None, cfg: InferenceConfig) -> PromptDetections:
    """Box-prompted masks: the IoU-weighted average of each box's positive locations.

    Args:
        boxes: (B, M, 4) prompt boxes XYXY in input pixels (every image has M boxes).
        labels: (B, M) int64 class of each box, -1 to predict it; ``None`` predicts all.
    """
    bsz, m = boxes.shape[:2]
    index, valid = prompt_locations(outputs.locations, outputs.strides, outputs.levels, boxes,
                                    topk=cfg.prompt_topk, radius=cfg.center_radius)  # (B,M,K)
    k = index.shape[-1]
    batch = torch.arange(bsz, device=boxes.device)[:, None, None].expand_as(index)
    pred_boxes = decode_boxes(outputs.locations[index], outputs.box_reg[batch, index],
                              outputs.strides[index])  # (B, M, K, 4)
    weights = iou_weights(pred_boxes, boxes, valid, cfg.prompt_mu)  # (B, M, K)
    cls_prob = outputs.cls_logits[batch, index].sigmoid()  # (B, M, K, C)
    ctr_prob = outputs.ctrness[batch, index].sigmoid()  # (B, M, K)
    predicted = (cls_prob * weights[..., None]).sum(dim=2).argmax(dim=-1)  # (B, M)
    if labels is None:
        labels = predicted
    else:
        labels = torch.where(labels >= 0, labels, predicted)
    chosen = cls_prob.gather(-1, labels[:, :, None, None].expand(-1, -1, k, 1))[..., 0]
    scores = ((chosen * ctr_prob).sqrt() * weights).sum(dim=-1)  # (B, M)
    logits = model.mask_head(
        outputs.mask_feats,
        outputs.controller[batch, index].reshape(bsz * m * k, -1),
        outputs.locations[index].reshape(-1, 2),
        outputs.levels[index].reshape(-1),
        batch.reshape(-1),
    )  # (B*M*K, 1, H/4, W/4)
    probs = logits.sigmoid().reshape(bsz, m, k, *logits.shape[-2:])
    return PromptDetections(weighted_instance_map(probs, weights), scores, labels)


def postprocess_masks(mask_probs: Tensor, resized_size: tuple[int, int],
                      orig_size: tuple[int, int], threshold: float = 0.5,
                      clip_boxes: Tensor | None = None, chunk: int = 16) -> Tensor:
    """Stride-4 mask probabilities of the padded input -> boolean masks of the original image.

    Args:
        mask_probs: (K, H/4, W/4) float probabilities.
        resized_size: (h, w) of the resized image inside the padded input.
        orig_size: (H0, W0) of the original image.
        threshold: probability threshold (0.5).
        clip_boxes: optional (K, 4) XYXY boxes in original pixels; masks are zeroed outside.
        chunk: masks processed at a time, bounding peak memory.

    Returns:
        (K, H0, W0) bool.
    """
    h0, w0 = orig_size
    out = torch.zeros((mask_probs.shape[0], h0, w0), dtype=torch.bool, device=mask_probs.device)
    if clip_boxes is not None:
        ys = torch.arange(h0, device=mask_probs.device, dtype=torch.float32) + 0.5
        xs = torch.arange(w0, device=mask_probs.device, dtype=torch.float32) + 0.5
    for start in range(0, mask_probs.shape[0], chunk):
        part = aligned_bilinear(mask_probs[start:start + chunk, None].float(), 4)
        part = part[:, :, : resized_size[0], : resized_size[1]]
        part = F.interpolate(part, size=(h0, w0), mode="bilinear", align_corners=False)[:, 0]
        masks = part > threshold
        if clip_boxes is not None:
            bx = clip_boxes[start:start + chunk].float()
            inside_y = (ys[None] >= bx[:, 1:2]) & (ys[None] <= bx[:, 3:4])  # (k, H0)
            inside_x = (xs[None] >= bx[:, 0:1]) & (xs[None] <= bx[:, 2:3])  # (k, W0)
            masks &= inside_y[:, :, None] & inside_x[:, None, :]
        out[start:start + chunk] = masks
    return out
