"""TensorRT backend: runs the engines built by ``python -m export --format tensorrt``.

``tensorrt`` is imported only here, when a backend is created. Buffers are torch CUDA tensors:
inputs are copied to the GPU, outputs are allocated with the shapes the execution context
reports, and ``execute_async_v3`` runs on torch's current CUDA stream (TensorRT 10 API).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import CheckpointError, InputError
from ..inference.postprocess import Detections, PromptDetections
from ..model_config import InferenceConfig
from .exported import (
    AUTO_OUTPUTS,
    ExportSidecar,
    StaticShapeBackend,
    check_image_batch,
    file_sha256,
    graph_detections,
    read_sidecar,
    resolve_inference,
)


def import_tensorrt() -> Any:
    """``import tensorrt`` with a one-line fix when it is missing."""
    try:
        import tensorrt
    except ImportError:
        raise CheckpointError(
            "tensorrt is not installed: pip install tensorrt (needs an NVIDIA GPU and CUDA)"
        ) from None
    return tensorrt


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
        trt.DataType.BOOL: torch.bool,
        trt.DataType.INT8: torch.int8,
        trt.DataType.UINT8: torch.uint8,
        trt.DataType.BF16: torch.bfloat16,
    }
    if dtype not in table:
        raise CheckpointError(f"TensorRT engine uses unsupported I/O type {dtype}; re-export")
    return table[dtype]


class TensorRTEngine:
    """One deserialised engine with an execution context; call it with named tensors."""

    def __init__(self, trt: Any, path: Path, device: torch.device) -> None:
        self.trt = trt
        self.device = device
        logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(logger)
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise CheckpointError(
                f"TensorRT engine {path}: cannot be deserialised (corrupt, or built with another "
                "TensorRT version or GPU); rebuild it with python -m export --format tensorrt"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]

    def __call__(self, **feeds: Tensor) -> list[Tensor]:
        """Run with input tensors by name; returns the outputs in engine order."""
        trt, ctx = self.trt, self.context
        keep = []
        for name in self.inputs:
            dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(name))
            tensor = feeds[name].to(self.device, dtype).contiguous()
            keep.append(tensor)
            if not ctx.set_input_shape(name, tuple(tensor.shape)):
                raise InputError(
                    f"TensorRT input {name} of shape {tuple(tensor.shape)} is outside the "
                    "engine's optimisation profile; rebuild the engine with a larger profile"
                )
            ctx.set_tensor_address(name, tensor.data_ptr())
        outputs = []
        for name in self.outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise CheckpointError(f"TensorRT output {name} has an unresolved shape {shape}")
            dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(name))
            out = torch.empty(shape, dtype=dtype, device=self.device)
            ctx.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        stream = torch.cuda.current_stream(self.device)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed; see the TensorRT log")
        stream.synchronize()
        return outputs


class TensorRTBackend:
    """The :class:`serving.backends.Backend` protocol over the two TensorRT engines."""

    name = "tensorrt"

    def __init__(self, sidecar: ExportSidecar, cfg: InferenceConfig, device: str = "cuda") -> None:
        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise CheckpointError("TensorRT needs a CUDA GPU, and torch sees none")
        self.torch_device = torch.device("cuda" if device in ("auto", "cuda") else device)
        self.device = str(self.torch_device)
        self.sidecar, self.cfg = sidecar, cfg
        self.engines = {}
        for kind in ("automatic", "prompt"):
            path = sidecar.file(kind, engine=True)
            if not path.is_file():
                raise CheckpointError(f"TensorRT engine {path} not found; rebuild with "
                                      "python -m export --format tensorrt")
            if file_sha256(path) != sidecar.engines[kind].get("sha256"):
                raise CheckpointError(
                    f"TensorRT engine {path} does not match its sidecar {sidecar.path.name} "
                    "(checksum differs); rebuild with python -m export --format tensorrt"
                )
            self.engines[kind] = TensorRTEngine(trt, path, self.torch_device)

    def _sizes(self, image_sizes: list[tuple[int, int]]) -> Tensor:
        return torch.tensor(image_sizes, dtype=torch.int64).reshape(-1, 2)

    def detect(self, images: Tensor, image_sizes: list[tuple[int, int]]) -> list[Detections]:
        check_image_batch(images, image_sizes)
        out = self.engines["automatic"](images=images, image_sizes=self._sizes(image_sizes))
        named = dict(zip(self.engines["automatic"].outputs, out))
        return graph_detections([named[name] for name in AUTO_OUTPUTS], self.cfg,
                                self.sidecar.inference)

    def segment_boxes(self, images: Tensor, image_sizes: list[tuple[int, int]], boxes: Tensor,
                      labels: Tensor) -> PromptDetections:
        check_image_batch(images, image_sizes)
        out = self.engines["prompt"](images=images, image_sizes=self._sizes(image_sizes),
                                     boxes=boxes, box_labels=labels)
        named = dict(zip(self.engines["prompt"].outputs, out))
        return PromptDetections(named["masks"].float(), named["scores"].float(),
                                named["labels"].long())


def load_tensorrt_segmenter(cls: type, path: str | os.PathLike, device: str = "cuda",
                            **overrides: Any) -> Any:
    """Build ``cls`` (a ``Segmenter``) over the TensorRT engines of the export ``path`` names
    (its sidecar ``.json``, an ``.engine`` file or an ``.onnx`` file of the same export)."""
    sidecar = read_sidecar(path)
    if not sidecar.engines:
        raise CheckpointError(
            f"{sidecar.path}: no TensorRT engines recorded; build them with "
            "python -m export --format tensorrt"
        )
    cfg = resolve_inference(sidecar, overrides)
    backend: Any = TensorRTBackend(sidecar, cfg, device=device)
    static = sidecar.input_rules.get("static_shape")
    if static:
        backend = StaticShapeBackend(backend, *static)
    info = {"backbone": sidecar.model.backbone, "path": str(sidecar.path),
            "precision": sidecar.engines["automatic"].get("precision")}
    return cls(backend, sidecar.class_names, cfg, info, card=sidecar.card)
