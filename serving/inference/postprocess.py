"""The one post-processing implementation: automatic detection and box-prompted masks.

Used by every backend: the torch backend runs these functions eagerly, the export wrapper
(``export/wrapper.py``) traces the very same functions into the ONNX graphs, and ONNX Runtime
and TensorRT return the graph's outputs in the same :class:`PaddedDetections` layout.
Steps follow SIM_SPEC section 5:

1. ``p = sigmoid(cls) * sigmoid(ctr)``, the top ``pre_nms_topk`` (location, class) pairs of each
   level, candidates ``p > score_threshold`` with a non-empty box; boxes decoded from the
   location; score ``sqrt(p)``. Every slot is kept with a validity mask (fixed shapes).
2. Class-aware NMS at IoU 0.6 (:func:`serving.inference.nms.class_nms_keep`), the top
   ``max_detections`` kept slots per image (a fixed-size top-K, padded).
3. Dynamic mask head on the kept detections -> probabilities at stride 4.
4. :func:`serving.inference.paste.mask_crops`: aligned x4 upsampling to the padded input,
   crop to the resized image, bilinear resize to the original size, threshold 0.5, computed
   per instance inside its region only (:func:`postprocess_masks` is its dense form).

Eager inference swaps two operators inside the same steps, with the same results: NMS runs
torchvision's ``batched_nms`` on the valid candidates, and the mask head runs only on used
slots (see :func:`serving.model.ops.eager_no_grad`).

Box-prompted mode (:func:`segment_boxes`) takes, for each prompt box, the FCOS locations that
training would assign to it and averages their masks with weights ``exp(mu * IoU)`` (the
paper's M_I, Eq. 6).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..model.condinst import CondInst, CondInstOutputs
from ..model.ops import decode_boxes, eager_no_grad
from ..model_config import InferenceConfig
from .assign import iou_weights, prompt_locations, weighted_instance_map
from .nms import class_nms_keep
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

    def above(self, min_score: float | None) -> Detections:
        """The detections scoring at least ``min_score`` (all of them when ``None``): the one
        score filter behind ``Segmenter.predict(..., score_threshold=...)``."""
        if min_score is None:
            return self
        keep = self.scores >= min_score
        n = int(keep.sum())
        if bool(keep[:n].all()):  # scores sorted descending: the first n, as views (no copy)
            return Detections(self.boxes[:n], self.scores[:n], self.labels[:n],
                              self.mask_probs[:n])
        return Detections(self.boxes[keep], self.scores[keep], self.labels[keep],
                          self.mask_probs[keep])


class PaddedDetections(NamedTuple):
    """Automatic detections of a batch, padded to K = ``max_detections`` slots per image: what
    :func:`detect` returns and what the exported automatic graph outputs (same names).

    Attributes:
        boxes: (B, K, 4) float XYXY input pixels; 0 in unused slots.
        scores: (B, K) float sorted descending; 0 in unused slots.
        labels: (B, K) int64 class indices; -1 in unused slots.
        mask_probs: (B, K, H/4, W/4) float probabilities at stride 4; 0 in unused slots.
        num: (B,) int64 used slots per image (they come first).
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    mask_probs: Tensor
    num: Tensor

    def unpad(self) -> list[Detections]:
        """One :class:`Detections` per image: its first ``num[b]`` slots (views, no copy)."""
        out = []
        for b, n in enumerate(self.num.tolist()):
            out.append(Detections(self.boxes[b, :n].float(), self.scores[b, :n].float(),
                                  self.labels[b, :n].long(), self.mask_probs[b, :n].float()))
        return out


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
    its slots with zero scores; callers drop them with ``scores > threshold``. Levels are
    taken one at a time, so the peak extra memory is one copy of ``probs``.

    Args:
        probs: (..., N, C) candidate scores (>= 0); levels: (N,) level of each location.
        num_levels: number of pyramid levels L; topk: pairs kept per level.
        pad: always return ``topk`` slots per level (zero-padded, index clamped into range)
            even when ``N*C < topk``. :func:`detect` uses this so that the shapes do not
            depend on the image size; the kept scores are the same.

    Returns:
        scores (..., L*k) and flat indices (..., L*k) into ``probs.flatten(-2)``;
        k = topk with ``pad``, else min(topk, N*C).
    """
    n, c = probs.shape[-2:]
    k = topk if pad else min(topk, n * c)
    all_scores, all_index = [], []
    for level in range(num_levels):
        in_level = (levels == level).to(probs.dtype)[:, None]  # (N, 1)
        flat = (probs * in_level).flatten(-2)  # (..., N*C)
        if pad:
            flat = torch.cat((flat, flat.new_zeros((*flat.shape[:-1], topk))), dim=-1)
        scores, index = flat.topk(k, dim=-1)
        all_scores.append(scores)
        all_index.append(index.clamp(max=n * c - 1) if pad else index)
    return torch.cat(all_scores, dim=-1), torch.cat(all_index, dim=-1)


def clip_boxes(boxes: Tensor, heights: Tensor, widths: Tensor) -> Tensor:
    """Clip XYXY boxes (..., 4) to [0, w] x [0, h]; ``heights``/``widths`` broadcast to
    ``boxes[..., 0]`` (for example 0-d tensors, or (B, 1) for a (B, S, 4) batch)."""
    h, w = heights.to(boxes.dtype), widths.to(boxes.dtype)
    x1, y1, x2, y2 = boxes.clamp(min=0).unbind(-1)
    return torch.stack((torch.minimum(x1, w), torch.minimum(y1, h), torch.minimum(x2, w),
                        torch.minimum(y2, h)), dim=-1)


def take(values: Tensor, index: Tensor) -> Tensor:
    """Per-image gather: values (B, N, ...) and index (B, S) -> (B, S, ...)."""
    shape = index.shape + values.shape[2:]
    flat = index.reshape(*index.shape, *([1] * (values.dim() - 2)))
    return values.gather(1, flat.expand(shape))


def _candidates(model: CondInst, outputs: CondInstOutputs, image_sizes: Tensor,
                cfg: InferenceConfig) -> tuple[Tensor, ...]:
    """Step 1: (B, S) slots: scores (sqrt(p), 0 where invalid), locations, labels, valid, and
    the (B, S, 4) boxes clipped to each resized image."""
    num_classes = outputs.cls_logits.shape[-1]
    probs = outputs.cls_logits.sigmoid() * outputs.ctrness.sigmoid()[..., None]  # (B, N, C)
    scores, flat = level_topk_candidates(probs, outputs.levels, len(model.strides),
                                         cfg.pre_nms_topk, pad=True)  # (B, S)
    loc, label = flat // num_classes, flat % num_classes
    boxes = decode_boxes(outputs.locations[loc], take(outputs.box_reg, loc),
                         outputs.strides[loc])
    boxes = clip_boxes(boxes, image_sizes[:, 0:1], image_sizes[:, 1:2])  # (B, S, 4)
    valid = (scores > cfg.score_threshold) & (boxes[..., 2] > boxes[..., 0]) & (
        boxes[..., 3] > boxes[..., 1])
    scores = torch.where(valid, scores.sqrt(), torch.zeros_like(scores))
    return scores, loc, label, valid, boxes


def _top_k(keep: Tensor, k: int, *slots: Tensor) -> tuple[Tensor, ...]:
    """Step 2b: the ``k`` best kept slots of each image, best first, padded.

    Args:
        keep: (B, S) bool; slots: (B, S, ...) tensors, the first one the scores.

    Returns:
        ``used`` (B, k) bool, ``num`` (B,) int64 and each slot tensor gathered to (B, k, ...).
    """
    scores = slots[0]
    ranked = torch.where(keep, scores, torch.full_like(scores, -1.0))
    if ranked.shape[1] < k:  # fewer slots than K (a tiny pre_nms_topk): pad with -1
        ranked = torch.cat((ranked, ranked.new_full((ranked.shape[0], k), -1.0)), dim=1)
        slots = tuple(torch.cat((t, t.new_zeros((t.shape[0], k, *t.shape[2:]))), dim=1)
                      for t in slots)
    top = ranked.topk(k, dim=1).indices  # (B, K), sorted descending
    num = keep.sum(dim=1).clamp(max=k)
    used = torch.arange(k, device=num.device)[None, :] < num[:, None]  # (B, K)
    return (used, num, *(take(t, top) for t in slots))


def _detection_masks(model: CondInst, outputs: CondInstOutputs, loc: Tensor,
                     used: Tensor) -> Tensor:
    """Step 3: (B, K, H/4, W/4) mask probabilities of the detections at locations ``loc``
    (B, K); 0 in unused slots. Eagerly only the used slots run the mask head."""
    bsz, k = loc.shape
    image = torch.arange(bsz, device=loc.device)[:, None].expand_as(loc)
    params = model.controller_params(outputs, image, loc)  # (B, K, num_params)
    if eager_no_grad():
        sel_b, sel_k = used.nonzero().unbind(1)
        sel_loc = loc[sel_b, sel_k]
        logits = model.mask_head(outputs.mask_feats, params[sel_b, sel_k],
                                 outputs.locations[sel_loc], outputs.levels[sel_loc], sel_b)
        masks = logits.new_zeros((bsz, k, *logits.shape[-2:]))
        masks[sel_b, sel_k] = logits[:, 0].sigmoid()
        return masks
    logits = model.mask_head(outputs.mask_feats, params.flatten(0, 1),
                             outputs.locations[loc].flatten(0, 1),
                             outputs.levels[loc].flatten(0, 1), image.flatten())  # (B*K,1,h,w)
    masks = logits.sigmoid().reshape(bsz, k, *logits.shape[-2:])
    return masks * used[..., None, None].to(masks.dtype)


def detect(model: CondInst, outputs: CondInstOutputs, image_sizes: Tensor,
           cfg: InferenceConfig) -> PaddedDetections:
    """Automatic instance segmentation of a batch: steps 1-3 (see the module docstring).

    Args:
        model: the network (its ``mask_head`` is run on the kept detections).
        outputs: ``model(images)``.
        image_sizes: (B, 2) int64 (height, width) of each resized image before padding.
        cfg: thresholds and limits (``score_threshold``, ``pre_nms_topk``, ``nms_threshold``,
            ``max_detections``).

    Returns:
        :class:`PaddedDetections` in the network-input frame; ``.unpad()`` gives one
        :class:`Detections` per image.
    """
    scores, loc, label, valid, boxes = _candidates(model, outputs, image_sizes, cfg)
    keep = class_nms_keep(boxes, scores, label, valid, outputs.cls_logits.shape[-1],
                          cfg.nms_threshold)
    used, num, scores, boxes, label, loc = _top_k(keep, cfg.max_detections, scores, boxes,
                                                  label, loc)
    boxes = boxes * used[..., None].to(boxes.dtype)
    scores = torch.where(used, scores, torch.zeros_like(scores))
    label = torch.where(used, label, torch.full_like(label, -1))
    masks = _detection_masks(model, outputs, loc, used)
    return PaddedDetections(boxes, scores, label, masks, num)


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
    params = model.controller_params(outputs, batch, index)  # (B, M, K, num_params)
    if eager_no_grad():
        return PromptDetections(_prompt_maps_eager(model, outputs, params, index, valid, weights,
                                                   batch), scores, labels)
    logits = model.mask_head(
        outputs.mask_feats,
        params.reshape(bsz * m * k, -1),
        outputs.locations[index].reshape(-1, 2),
        outputs.levels[index].reshape(-1),
        batch.reshape(-1),
    )  # (B*M*K, 1, H/4, W/4)
    probs = logits.sigmoid().reshape(bsz, m, k, *logits.shape[-2:])
    return PromptDetections(weighted_instance_map(probs, weights), scores, labels)


#: Bytes of (boxes, K, H/4, W/4) probabilities per chunk of :func:`_prompt_maps_eager`.
PROMPT_CHUNK_BYTES = {"cpu": 16 << 20, "cuda": 512 << 20}


def _prompt_maps_eager(model: CondInst, outputs: CondInstOutputs, params: Tensor, index: Tensor,
                       valid: Tensor, weights: Tensor, batch: Tensor) -> Tensor:
    """M_I of every prompt box, (B, M, H/4, W/4), computing only the masks that count.

    A box's unused location slots (``valid`` False) have weight exactly 0, so their masks add
    exact zeros to the weighted sum: they are left at 0 instead of being computed (about
    half of the K slots for boxes of ordinary size). Boxes are processed in chunks of about
    ``PROMPT_CHUNK_BYTES`` of probabilities. ``params`` (B, M, K, num_params) are the
    controller outputs of every slot, computed once as the fixed-shape path does, so the
    values are the same as that path's.
    """
    bsz, m, k = index.shape
    mask_feats = outputs.mask_feats
    h4, w4 = 2 * mask_feats.shape[-2], 2 * mask_feats.shape[-1]
    flat_index, flat_batch = index.reshape(-1), batch.reshape(-1)
    flat_params = params.reshape(bsz * m * k, -1)
    flat_valid, flat_weights = valid.reshape(-1), weights.reshape(bsz * m, k)
    budget = PROMPT_CHUNK_BYTES.get(mask_feats.device.type, PROMPT_CHUNK_BYTES["cpu"])
    step = max(1, budget // (k * h4 * w4 * 4))
    out = mask_feats.new_zeros((bsz * m, h4, w4))  # replaced by the first chunk's dtype
    for start in range(0, bsz * m, step):
        stop = min(start + step, bsz * m)
        rows = slice(start * k, stop * k)
        sel = torch.nonzero(flat_valid[rows])[:, 0]
        loc, img = flat_index[rows][sel], flat_batch[rows][sel]
        logits = model.mask_head(mask_feats, flat_params[rows][sel],
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
