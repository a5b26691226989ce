"""Class-aware NMS as one graph operator: a ``torch.library`` custom op and its ONNX form.

The eager post-processing (:func:`serving.inference.postprocess.detect`) filters candidates
with boolean indexing and calls ``torchvision.ops.batched_nms``, whose output size depends on
the data.
The export graph instead keeps every candidate slot and asks for a keep *mask*:
``multiclass_nms_keep(boxes (B, S, 4), scores (B, C, S), iou, max_per_class) -> (B, S) bool``.
It exports to the standard ONNX ``NonMaxSuppression`` with its batch and class dimensions
(greedy NMS per image and class, like torchvision's per-class loop, with no coordinate-offset
trick), followed by a ``ScatterND`` that turns the selected indices into the mask. ONNX
Runtime and TensorRT's ONNX parser both implement ``NonMaxSuppression``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchvision.ops import nms

_BOOL = 9  # onnx.TensorProto.BOOL


@torch.library.custom_op("sim_export::multiclass_nms_keep", mutates_args=())
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


def multiclass_nms_keep_onnx(boxes: Any, scores: Any, iou_threshold: float,
                             max_per_class: int) -> Any:
    """ONNX translation (onnxscript, traced) for the dynamo exporter."""
    from onnxscript import opset18 as op

    selected = op.NonMaxSuppression(
        boxes, scores, op.Constant(value_ints=[int(max_per_class)]),
        op.Constant(value_floats=[float(iou_threshold)]), op.Constant(value_floats=[0.0]),
    )  # (n, 3): batch, class, box
    index = op.Gather(selected, op.Constant(value_ints=[0, 2]), axis=1)  # (n, 2): batch, box
    ones = op.Expand(op.Constant(value_float=1.0), op.Shape(selected, start=0, end=1))
    zeros = op.ConstantOfShape(op.Shape(boxes, start=0, end=2))  # float 0, (B, S)
    return op.Cast(op.ScatterND(zeros, index, ones), to=_BOOL)


#: ``custom_translation_table`` entry for ``torch.onnx.export(..., dynamo=True)``.
ONNX_TRANSLATIONS = {torch.ops.sim_export.multiclass_nms_keep.default: multiclass_nms_keep_onnx}


def _torchscript_symbolic(g: Any, boxes: Any, scores: Any, iou_threshold: Any,
                          max_per_class: Any) -> Any:
    """The same ONNX subgraph for the TorchScript exporter (``dynamo=False``)."""
    from torch.onnx import symbolic_helper

    def const(value: Any, dtype: torch.dtype) -> Any:
        return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))

    iou = symbolic_helper._parse_arg(iou_threshold, "f")
    limit = symbolic_helper._parse_arg(max_per_class, "i")
    selected = g.op("NonMaxSuppression", boxes, scores, const([limit], torch.int64),
                    const([iou], torch.float32), const([0.0], torch.float32))
    index = g.op("Gather", selected, const([0, 2], torch.int64), axis_i=1)
    count = g.op("Slice", g.op("Shape", selected), const([0], torch.int64),
                 const([1], torch.int64))
    ones = g.op("Expand", const(1.0, torch.float32), count)
    size = g.op("Slice", g.op("Shape", boxes), const([0], torch.int64), const([2], torch.int64))
    zeros = g.op("ConstantOfShape", size, value_t=torch.tensor([0.0]))
    return g.op("Cast", g.op("ScatterND", zeros, index, ones), to_i=_BOOL)


def register_torchscript_symbolic(opset: int) -> None:
    """Register :func:`_torchscript_symbolic` for the TorchScript exporter at ``opset``."""
    torch.onnx.register_custom_op_symbolic("sim_export::multiclass_nms_keep",
                                           _torchscript_symbolic, opset)
