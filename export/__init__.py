"""export: checkpoint -> ONNX graphs (automatic + box-prompted) and TensorRT engines, verified
against PyTorch. Builds on :mod:`serving`; never imported by it.

>>> from export import export_onnx, verify_export
>>> result = export_onnx("model_final.safetensors", "exported/")
>>> verify_export("model_final.safetensors", result.sidecar, ["image.jpg"]).passed
"""

from .onnx import ExportResult, export_onnx
from .tensorrt import build_tensorrt_engine, check_tensorrt_ops
from .verify import VerificationError, VerifyReport, verify_export

__all__ = [
    "ExportResult",
    "VerificationError",
    "VerifyReport",
    "build_tensorrt_engine",
    "check_tensorrt_ops",
    "export_onnx",
    "verify_export",
]
