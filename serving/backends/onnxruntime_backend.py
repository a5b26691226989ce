"""ONNX Runtime backend: runs the two graphs written by ``python -m export``.

``onnxruntime`` is imported only here, and only when a backend is created. Providers are
chosen automatically (CUDA when the installed onnxruntime has it, else CPU) and can be given
explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import CheckpointError, InputError
from ..inference.postprocess import Detections, PromptDetections
from ..model_config import InferenceConfig
from .exported import (
    ExportSidecar,
    StaticShapeBackend,
    as_torch,
    check_image_batch,
    graph_detections,
    read_sidecar,
    resolve_inference,
)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def import_onnxruntime() -> Any:
    """``import onnxruntime`` with a one-line fix when it is missing."""
    try:
        import onnxruntime
    except ImportError:
        raise CheckpointError(
            "onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu)"
        ) from None
    return onnxruntime


def choose_providers(available: Sequence[str], device: str = "auto",
                     providers: Sequence[Any] | None = None) -> list[Any]:
    """Execution providers for ``device``: "auto" prefers CUDA when available, "cpu" forces
    the CPU, "cuda" / "cuda:N" needs the CUDA provider. Explicit ``providers`` win."""
    if providers:
        for p in providers:
            name = p[0] if isinstance(p, (tuple, list)) else p
            if name not in available:
                raise InputError(
                    f"provider {name} is not available in this onnxruntime (available: "
                    f"{', '.join(available)}); install onnxruntime-gpu for CUDA"
                )
        return list(providers)
    device = str(device)
    if device == "cpu":
        return [CPU]
    if device.startswith("cuda"):
        if CUDA not in available:
            raise InputError(
                f"device={device}: this onnxruntime has no CUDAExecutionProvider; "
                "pip install onnxruntime-gpu, or use device=cpu"
            )
        index = int(device.split(":")[1]) if ":" in device else 0
        return [(CUDA, {"device_id": index}), CPU]
    if device != "auto":
        raise InputError(f"device={device!r}: use auto, cpu, cuda or cuda:N")
    return [CUDA, CPU] if CUDA in available else [CPU]


def _session(ort: Any, path: Path, providers: list[Any], threads: int | None) -> Any:
    if not path.is_file():
        raise CheckpointError(f"ONNX graph {path} not found; keep it next to its sidecar .json")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    # Worker threads that spin after a run compete with the torch post-processing (mask
    # pasting) that follows on the same cores: measured 10-20 % of end-to-end time on 2 cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several untyped errors
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"ONNX graph {path}: cannot be loaded ({reason}); the file may be truncated or "
            "corrupt, re-export it with python -m export"
        ) from None


class OnnxRuntimeBackend:
    """The :class:`serving.backends.Backend` protocol over the exported ONNX graphs."""

    name = "onnxruntime"

    def __init__(self, sidecar: ExportSidecar, cfg: InferenceConfig, device: str = "auto",
                 providers: Sequence[Any] | None = None, threads: int | None = None) -> None:
        ort = import_onnxruntime()
        self.sidecar = sidecar
        self.cfg = cfg
        self.providers = choose_providers(ort.get_available_providers(), device, providers)
        first = self.providers[0][0] if isinstance(self.providers[0], tuple) else self.providers[0]
        self.device = "cuda" if first == CUDA else "cpu"
        self.torch_device = torch.device(
            "cuda" if self.device == "cuda" and torch.cuda.is_available() else "cpu")
        self.sessions = {}
        for kind in ("automatic", "prompt"):
            path = sidecar.file(kind)
            session = _session(ort, path, self.providers, threads)
            self._check(kind, path, session)
            self.sessions[kind] = session

    def _check(self, kind: str, path: Path, session: Any) -> None:
        meta = session.get_modelmeta().custom_metadata_map
        if meta.get("export_id") != self.sidecar.export_id or meta.get("graph") != kind:
            raise CheckpointError(
                f"ONNX graph {path} does not belong to sidecar {self.sidecar.path.name} (export "
                f"id {meta.get('export_id')!r}, graph {meta.get('graph')!r}); keep the files of "
                "one export together or re-export"
            )
        spec = self.sidecar.graphs[kind]
        names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
        if names != (list(spec["inputs"]), list(spec["outputs"])):
            raise CheckpointError(
                f"ONNX graph {path}: inputs/outputs {names} differ from the sidecar's; re-export"
            )

    def _feed(self, images: Tensor, image_sizes: list[tuple[int, int]]) -> dict[str, np.ndarray]:
        check_image_batch(images, image_sizes)
        return {
            "images": np.ascontiguousarray(images.detach().float().cpu().numpy()),
            "image_sizes": np.asarray(image_sizes, dtype=np.int64).reshape(-1, 2),
        }

    def detect(self, images: Tensor, image_sizes: list[tuple[int, int]]) -> list[Detections]:
        outs = self.sessions["automatic"].run(None, self._feed(images, image_sizes))
        return graph_detections([as_torch(o, self.torch_device) for o in outs], self.cfg,
                                self.sidecar.inference)

    def segment_boxes(self, images: Tensor, image_sizes: list[tuple[int, int]], boxes: Tensor,
                      labels: Tensor) -> PromptDetections:
        feed = self._feed(images, image_sizes)
        feed["boxes"] = np.ascontiguousarray(boxes.detach().float().cpu().numpy())
        feed["box_labels"] = np.ascontiguousarray(labels.detach().long().cpu().numpy())
        masks, scores, out_labels = self.sessions["prompt"].run(None, feed)
        return PromptDetections(as_torch(masks, self.torch_device),
                                as_torch(scores, self.torch_device),
                                as_torch(out_labels, self.torch_device))


def load_onnx_segmenter(cls: type, path: str | os.PathLike, device: str = "auto",
                        providers: Sequence[Any] | None = None, threads: int | None = None,
                        **overrides: Any) -> Any:
    """Build ``cls`` (a ``Segmenter``) over the export that ``path`` names (its sidecar
    ``.json``, either ``.onnx`` graph, or the folder). ``overrides`` change inference settings
    within what the graphs allow (see :func:`serving.backends.exported.resolve_inference`)."""
    sidecar = read_sidecar(path)
    cfg = resolve_inference(sidecar, overrides)
    backend: Any = OnnxRuntimeBackend(sidecar, cfg, device=device, providers=providers,
                                      threads=threads)
    static = sidecar.input_rules.get("static_shape")
    if static:
        backend = StaticShapeBackend(backend, *static)
    info = {"backbone": sidecar.model.backbone, "path": str(sidecar.path),
            "providers": backend.providers if hasattr(backend, "providers") else None,
            "precision": sidecar.precision}
    return cls(backend, sidecar.class_names, cfg, info, card=sidecar.card)
