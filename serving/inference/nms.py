"""Class-aware NMS over fixed candidate slots, as a keep mask: the NMS step of
:func:`serving.inference.postprocess.detect`.

:func:`class_nms_keep` takes every candidate slot of a batch with a validity mask and returns
which slots NMS keeps. It has two interchangeable operators with the same result (greedy NMS
per image and class, IoU above the threshold suppresses the lower score):

- eager inference (:func:`serving.model.ops.eager_no_grad`): torchvision's ``batched_nms`` on
  each image's valid candidates (its output size depends on the data);
- anything traced (``torch.export``, ONNX export, autograd): the custom operator
  ``sim::multiclass_nms_keep`` below, whose output shape is fixed. ``export/onnx_nms.py`` translates
  it to the standard ONNX ``NonMaxSuppression`` (which ONNX Runtime and TensorRT implement).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms, nms

from ..model.ops import eager_no_grad


@torch.library.custom_op("sim::multiclass_nms_keep", mutates_args=())
def multiclass_nms_keep(boxes: Tensor, scores: Tensor, iou_threshold: float,
                        max_per_class: int) -> Tensor:
    """Greedy NMS per image and class; a box takes part in class c where ``scores[b, c] > 0``.

    Args:
        boxes: (B, S, 4) float XYXY.
        scores: (B, C, S) float >= 0; 0 marks "not a candidate of this class".
        iou_threshold: a box is suppressed by a higher-scoring box of its class when their IoU
            is above this.
        max_per_class: at most this many boxes kept per image and class (use S for all).

    Returns:
        (B, S) bool: True for the boxes NMS keeps.
    """
    keep = torch.zeros(boxes.shape[:2], dtype=torch.bool, device=boxes.device)
    for b in range(scores.shape[0]):
        for c in range(scores.shape[1]):
            cand = (scores[b, c] > 0).nonzero()[:, 0]
            if cand.numel():
                kept = nms(boxes[b, cand].float(), scores[b, c, cand].float(), iou_threshold)
                keep[b, cand[kept[:max_per_class]]] = True
    return keep


@multiclass_nms_keep.register_fake
def _multiclass_nms_keep_fake(boxes: Tensor, scores: Tensor, iou_threshold: float,
                              max_per_class: int) -> Tensor:
    return boxes.new_empty(boxes.shape[:2], dtype=torch.bool)


def class_nms_keep(boxes: Tensor, scores: Tensor, labels: Tensor, valid: Tensor,
                   num_classes: int, iou_threshold: float) -> Tensor:
    """Which candidate slots class-aware NMS keeps.

    Args:
        boxes: (B, S, 4) float XYXY; scores: (B, S) float (ranking score);
        labels: (B, S) int64 class of each slot, in [0, num_classes);
        valid: (B, S) bool, False for slots that are not candidates.
        iou_threshold: IoU above which the lower-scoring box of a class is suppressed.

    Returns:
        (B, S) bool, True for kept slots (always a subset of ``valid``).
    """
    if eager_no_grad():
        keep = torch.zeros_like(valid)
        for b in range(valid.shape[0]):
            idx = valid[b].nonzero()[:, 0]
            kept = batched_nms(boxes[b, idx].float(), scores[b, idx].float(), labels[b, idx],
                               iou_threshold)
            keep[b, idx[kept]] = True
        return keep
    classes = torch.arange(num_classes, device=labels.device)
    per_class = (labels[:, None, :] == classes[None, :, None]) & valid[:, None, :]  # (B, C, S)
    class_scores = torch.where(per_class, scores[:, None, :], torch.zeros_like(scores[:, None]))
    return multiclass_nms_keep(boxes, class_scores, iou_threshold, boxes.shape[1]) & valid
