"""The ONNX form of the library's NMS operator, for ``torch.onnx.export(..., dynamo=True)``.

The automatic post-processing (:func:`serving.inference.postprocess.detect`) keeps every
candidate slot and asks the graph operator ``sim::multiclass_nms_keep``
(:mod:`serving.inference.nms`) for a keep *mask*:
``(boxes (B, S, 4), scores (B, C, S), iou, max_per_class) -> (B, S) bool``. Here it becomes the
standard ONNX ``NonMaxSuppression`` with its batch and class dimensions (greedy NMS per image and
class, like torchvision's per-class loop, with no coordinate-offset trick), followed by a
``ScatterND`` that turns the selected indices into the mask. ONNX Runtime and TensorRT's ONNX
parser both implement ``NonMaxSuppression``.
"""

from __future__ import annotations

from typing import Any

import torch

import serving.inference.nms  # noqa: F401 - registers the operator

_BOOL = 9  # onnx.TensorProto.BOOL


def multiclass_nms_keep_onnx(boxes: Any, scores: Any, iou_threshold: float,
                             max_per_class: int) -> Any:
    """ONNX translation (onnxscript, traced) of ``sim::multiclass_nms_keep``."""
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
ONNX_TRANSLATIONS = {torch.ops.sim.multiclass_nms_keep.default: multiclass_nms_keep_onnx}
