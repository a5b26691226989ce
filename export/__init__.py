"""export: checkpoint -> ONNX graphs (automatic + box-prompted) and TensorRT engines, verified
against PyTorch. Builds on :mod:`serving`; never imported by it.

>>> from export import export_onnx, verify_export
>>> result = export_onnx("model_final.safetensors", "exported/")
>>> verify_export("model_final.safetensors", result.sidecar, ["image.jpg"]).passed
>>> int8 = quantize_export(result.sidecar, "calibration_images/")     # INT8 QDQ graphs
>>> verify_int8("model_final.safetensors", int8.sidecar, ["image.jpg"]).passed
"""

from .int8_calibration import CalibrationSet, load_calibration_set
from .onnx import ExportResult, export_onnx
from .quantize import QuantizeOptions, quantize_export
from .tensorrt import build_tensorrt_engine, check_tensorrt_ops
from .verify import VerificationError, VerifyReport, verify_export
from .verify_int8 import Int8Report, Int8Tolerances, verify_int8

__all__ = [
    "CalibrationSet",
    "ExportResult",
    "Int8Report",
    "Int8Tolerances",
    "QuantizeOptions",
    "VerificationError",
    "VerifyReport",
    "build_tensorrt_engine",
    "check_tensorrt_ops",
    "export_onnx",
    "load_calibration_set",
    "quantize_export",
    "verify_export",
    "verify_int8",
]
