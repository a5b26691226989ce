"""The one post-processing implementation: automatic detection and box-prompted masks.

Used by the ``Segmenter`` torch backend, by training's evaluation and (through the same
functions) by the export wrapper. Steps follow SIM_SPEC section 5:

1. ``p = sigmoid(cls) * sigmoid(ctr)``, candidates ``p > score_threshold``, at most
   ``pre_nms_topk`` per level; boxes decoded from the location; score ``sqrt(p)``.
2. Class-aware NMS at IoU 0.6, top ``max_detections`` per image.
3. Dynamic mask head on the kept detections -> probabilities at stride 4.
4. :func:`serving.inference.paste.mask_crops`: aligned x4 upsampling to the padded input,
   crop to the resized image, bilinear resize to the original size, threshold 0.5, computed
   per instance inside its region only (:func:`postprocess_masks` is its dense form).

Box-prompted mode (:func:`segment_boxes`) takes, for each prompt box, the FCOS locations that
training would assign to it and averages their masks with weights ``exp(mu * IoU)`` (the
paper's M_I, Eq. 6).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from ..config import InferenceConfig
from ..model.condinst import CondInst, CondInstOutputs
from ..model.ops import decode_boxes, eager_no_grad
from .assign import iou_weights, prompt_locations, weighted_instance_map
from .paste import mask_crops


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


def level_topk_candidates(probs: Tensor, levels: Tensor, num_levels: int, topk: int,
                          pad: bool = False) -> tuple[Tensor, Tensor]:
    """Top-``topk`` (location, class) pairs of each level, as fixed-shape tensors.

    Entries of other levels count as score 0, so a level with fewer than ``topk`` pairs fills
    its slots with zero scores; callers drop them with ``scores > threshold``.

    Args:
        probs: (..., N, C) candidate scores (>= 0); levels: (N,) level of each location.
        num_levels: number of pyramid levels L; topk: pairs kept per level.
        pad: always return ``topk`` slots per level (zero-padded, index clamped into range)
            even when ``N*C < topk``. The export graph uses this so that the shapes do not
            depend on the image size; the kept scores are the same.

    Returns:
        scores (..., L*k) and flat indices (..., L*k) into ``probs.flatten(-2)``;
        k = topk with ``pad``, else min(topk, N*C).
    """
    n, c = probs.shape[-2:]
    in_level = levels[None, :] == torch.arange(num_levels, device=levels.device)[:, None]
    per_level = probs.unsqueeze(-3) * in_level[..., None].to(probs.dtype)  # (..., L, N, C)
    per_level = per_level.flatten(-2)  # (..., L, N*C)
    if pad:
        k = topk
        filler = per_level.new_zeros((*per_level.shape[:-1], topk))
        per_level = torch.cat((per_level, filler), dim=-1)
    else:
        k = min(topk, n * c)
    scores, index = per_level.topk(k, dim=-1)  # (..., L, k)
    if pad:
        index = index.clamp(max=n * c - 1)
    return scores.flatten(-2), index.flatten(-2)


def clip_boxes(boxes: Tensor, heights: Tensor, widths: Tensor) -> Tensor:
    """Clip XYXY boxes (..., 4) to [0, w] x [0, h]; ``heights``/``widths`` broadcast to
    ``boxes[..., 0]`` (for example 0-d tensors, or (B, 1) for a (B, S, 4) batch)."""
    h, w = heights.to(boxes.dtype), widths.to(boxes.dtype)
    x1, y1, x2, y2 = boxes.clamp(min=0).unbind(-1)
    return torch.stack((torch.minimum(x1, w), torch.minimum(y1, h), torch.minimum(x2, w),
                        torch.minimum(y2, h)), dim=-1)


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
        boxes = clip_boxes(boxes, image_sizes[b, 0], image_sizes[b, 1])
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
    if eager_no_grad():
        return PromptDetections(_prompt_maps_eager(model, outputs, index, valid, weights, batch),
                                scores, labels)
    logits = model.mask_head(
        outputs.mask_feats,
        outputs.controller[batch, index].reshape(bsz * m * k, -1),
        outputs.locations[index].reshape(-1, 2),
        outputs.levels[index].reshape(-1),
        batch.reshape(-1),
    )  # (B*M*K, 1, H/4, W/4)
    probs = logits.sigmoid().reshape(bsz, m, k, *logits.shape[-2:])
    return PromptDetections(weighted_instance_map(probs, weights), scores, labels)


#: Bytes of (boxes, K, H/4, W/4) probabilities per chunk of :func:`_prompt_maps_eager`.
PROMPT_CHUNK_BYTES = {"cpu": 16 << 20, "cuda": 512 << 20}


def _prompt_maps_eager(model: CondInst, outputs: CondInstOutputs, index: Tensor, valid: Tensor,
                       weights: Tensor, batch: Tensor) -> Tensor:
    """M_I of every prompt box, (B, M, H/4, W/4), computing only the masks that count.

    A box's unused location slots (``valid`` False) have weight exactly 0, so their masks add
    exact zeros to the weighted sum: they are left at 0 instead of being computed (about
    half of the K slots for boxes of ordinary size). Boxes are processed in chunks of about
    ``PROMPT_CHUNK_BYTES`` of probabilities. Same values as the fixed-shape path.
    """
    bsz, m, k = index.shape
    mask_feats = outputs.mask_feats
    h4, w4 = 2 * mask_feats.shape[-2], 2 * mask_feats.shape[-1]
    flat_index, flat_batch = index.reshape(-1), batch.reshape(-1)
    flat_valid, flat_weights = valid.reshape(-1), weights.reshape(bsz * m, k)
    budget = PROMPT_CHUNK_BYTES.get(mask_feats.device.type, PROMPT_CHUNK_BYTES["cpu"])
    step = max(1, budget // (k * h4 * w4 * 4))
    out = mask_feats.new_zeros((bsz * m, h4, w4))  # replaced by the first chunk's dtype
    for start in range(0, bsz * m, step):
        stop = min(start + step, bsz * m)
        rows = slice(start * k, stop * k)
        sel = torch.nonzero(flat_valid[rows])[:, 0]
        loc, img = flat_index[rows][sel], flat_batch[rows][sel]
        logits = model.mask_head(mask_feats, outputs.controller[img, loc],
                                 outputs.locations[loc], outputs.levels[loc], img)
        probs = logits.new_zeros(((stop - start) * k, h4, w4))
        probs[sel] = logits[:, 0].sigmoid()
        maps = weighted_instance_map(probs.view(stop - start, k, h4, w4),
                                     flat_weights[start:stop])
        if start == 0:
            out = maps.new_empty((bsz * m, h4, w4))
        out[start:stop] = maps
    return out.view(bsz, m, h4, w4)


def postprocess_masks(mask_probs: Tensor, resized_size: tuple[int, int],
                      orig_size: tuple[int, int], threshold: float = 0.5,
                      clip_boxes: Tensor | None = None, chunk: int = 16) -> Tensor:
    """Stride-4 mask probabilities of the padded input -> full-size boolean masks.

    :func:`serving.inference.paste.mask_crops` (which the ``Segmenter`` uses: masks as
    per-instance crops, memory bounded by their extents) made dense.

    Args:
        mask_probs: (K, H/4, W/4) float probabilities.
        resized_size: (h, w) of the resized image inside the padded input.
        orig_size: (H0, W0) of the original image.
        threshold: probability threshold (0.5).
        clip_boxes: optional (K, 4) XYXY boxes in original pixels; masks are zeroed outside.
        chunk: unused (kept for callers of the earlier chunked version).

    Returns:
        (K, H0, W0) bool on ``mask_probs``' device (K x H0 x W0 bytes).
    """
    del chunk
    crops = mask_crops(mask_probs, resized_size, orig_size, threshold, clip_boxes)
    return torch.from_numpy(crops.dense()).to(mask_probs.device)
