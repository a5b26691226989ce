"""Export-only modules: the CondInst network plus the library's post-processing, tensor in,
tensor out, with fixed names.

These modules should not be called directly; they are traced by :mod:`export.onnx`. They
reuse the library's pieces (``CondInst.normalize``, ``level_topk_candidates``,
``decode_boxes``, ``clip_boxes``, ``CondInst.mask_head``, ``segment_boxes``) so the exported
graph runs the same operations as :class:`serving.backends.torch_backend.TorchBackend`. The
only rewrite is where eager code uses data-dependent boolean indexing: the automatic graph keeps
every candidate slot with a validity mask, runs NMS as one operator
(:func:`export.nms.multiclass_nms_keep`) and pads the result to ``max_detections``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from serving.config import InferenceConfig
from serving.inference.postprocess import clip_boxes, level_topk_candidates, segment_boxes
from serving.model import CondInst, decode_boxes

from .nms import multiclass_nms_keep

AUTO_INPUTS = ("images", "image_sizes")
AUTO_OUTPUTS = ("boxes", "scores", "labels", "masks", "num_detections")
PROMPT_INPUTS = ("images", "image_sizes", "boxes", "box_labels")
PROMPT_OUTPUTS = ("masks", "scores", "labels")


def valid_pixels(images: Tensor, image_sizes: Tensor) -> Tensor:
    """(B, 3, H, W) padded batch and (B, 2) int64 (h, w) -> (B, H, W) bool, True on pixels."""
    h, w = images.shape[-2:]
    rows = torch.arange(h, device=images.device)[None, :] < image_sizes[:, 0:1]  # (B, H)
    cols = torch.arange(w, device=images.device)[None, :] < image_sizes[:, 1:2]  # (B, W)
    return rows[:, :, None] & cols[:, None, :]


def _take(values: Tensor, index: Tensor) -> Tensor:
    """Per-image gather: values (B, N, ...) and index (B, S) -> (B, S, ...)."""
    shape = index.shape + values.shape[2:]
    flat = index.reshape(*index.shape, *([1] * (values.dim() - 2)))
    return values.gather(1, flat.expand(shape))


class AutomaticGraph(nn.Module):
    """Automatic instance segmentation, padded to ``max_detections`` = K.

    Inputs: ``images`` (B, 3, H, W) float RGB 0-255, zero-padded, H and W multiples of 32;
    ``image_sizes`` (B, 2) int64 (h, w) of each resized image inside the padding.

    Outputs (network-input frame): ``boxes`` (B, K, 4) float XYXY, ``scores`` (B, K) sorted
    descending, ``labels`` (B, K) int64 (-1 in unused slots), ``masks`` (B, K, H/4, W/4)
    float probabilities at stride 4, ``num_detections`` (B,) int64. Unused slots are zero.
    """

    def __init__(self, model: CondInst, cfg: InferenceConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg

    def forward(self, images: Tensor, image_sizes: Tensor) -> tuple[Tensor, ...]:
        model, cfg = self.model, self.cfg
        out = model(model.normalize(images, valid_pixels(images, image_sizes)))
        num_classes = out.cls_logits.shape[-1]
        probs = out.cls_logits.sigmoid() * out.ctrness.sigmoid()[..., None]  # (B, N, C)
        scores, flat = level_topk_candidates(probs, out.levels, len(model.strides),
                                             cfg.pre_nms_topk, pad=True)  # (B, S)
        loc, label = flat // num_classes, flat % num_classes
        boxes = decode_boxes(out.locations[loc], _take(out.box_reg, loc), out.strides[loc])
        boxes = clip_boxes(boxes, image_sizes[:, 0:1], image_sizes[:, 1:2])  # (B, S, 4)
        valid = (scores > cfg.score_threshold) & (boxes[..., 2] > boxes[..., 0]) & (
            boxes[..., 3] > boxes[..., 1])
        scores = torch.where(valid, scores.sqrt(), torch.zeros_like(scores))
        classes = torch.arange(num_classes, device=label.device)
        per_class = (label[:, None, :] == classes[None, :, None]) & valid[:, None, :]
        class_scores = torch.where(per_class, scores[:, None, :], torch.zeros_like(scores[:, None]))
        slots = len(model.strides) * cfg.pre_nms_topk  # S, static
        keep = multiclass_nms_keep(boxes, class_scores, cfg.nms_threshold, slots) & valid
        ranked = torch.where(keep, scores, torch.full_like(scores, -1.0))
        k = cfg.max_detections
        if ranked.shape[1] < k:  # fewer slots than K (a tiny pre_nms_topk): pad with -1
            ranked = torch.cat((ranked, ranked.new_full((ranked.shape[0], k), -1.0)), dim=1)
            boxes = torch.cat((boxes, boxes.new_zeros(boxes.shape[0], k, 4)), dim=1)
            loc = torch.cat((loc, loc.new_zeros(loc.shape[0], k)), dim=1)
            label = torch.cat((label, label.new_zeros(label.shape[0], k)), dim=1)
        top_scores, top = ranked.topk(k, dim=1)  # (B, K), sorted descending
        num = keep.sum(dim=1).clamp(max=k)
        used = torch.arange(k, device=num.device)[None, :] < num[:, None]  # (B, K)
        det_loc = torch.gather(loc, 1, top)
        det_boxes = _take(boxes, top) * used[..., None].to(boxes.dtype)
        det_scores = torch.where(used, top_scores, torch.zeros_like(top_scores))
        det_labels = torch.where(used, torch.gather(label, 1, top), torch.full_like(top, -1))
        bsz = det_loc.shape[0]
        image_index = torch.arange(bsz, device=det_loc.device)[:, None].expand_as(det_loc)
        logits = model.mask_head(out.mask_feats,
                                 _take(out.controller, det_loc).flatten(0, 1),
                                 out.locations[det_loc].flatten(0, 1),
                                 out.levels[det_loc].flatten(0, 1),
                                 image_index.flatten())  # (B*K, 1, H/4, W/4)
        masks = logits.sigmoid().reshape(bsz, k, *logits.shape[-2:])
        masks = masks * used[..., None, None].to(masks.dtype)
        return det_boxes, det_scores, det_labels, masks, num


class PromptGraph(nn.Module):
    """Box-prompted segmentation (the paper's M_I), one row per prompt box.

    Inputs: ``images`` and ``image_sizes`` as :class:`AutomaticGraph`; ``boxes`` (B, M, 4)
    float XYXY in the network-input frame; ``labels`` (B, M) int64 class per box, -1 to predict.

    Outputs: ``masks`` (B, M, H/4, W/4) float probabilities at stride 4, ``scores`` (B, M),
    ``labels`` (B, M) int64 (given or predicted).
    """

    def __init__(self, model: CondInst, cfg: InferenceConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg

    def forward(self, images: Tensor, image_sizes: Tensor, boxes: Tensor,
                box_labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        model = self.model
        out = model(model.normalize(images, valid_pixels(images, image_sizes)))
        result = segment_boxes(model, out, boxes, box_labels, self.cfg)
        return result.mask_probs, result.scores, result.labels
