"""What the ONNX Runtime and TensorRT backends share: the export sidecar and its checks.

``python -m export`` writes, next to the graphs, a JSON *sidecar* ``<name>.json``:

.. code-block:: json

    {"format": "sim-condinst-export", "format_version": 2, "export_id": "<uuid>",
     "class_names": [...], "model_config": {...}, "inference_config": {...},
     "calibration": {...}, "category_ids": [...], "history": [{"made_by": "train", ...},
     {"made_by": "export onnx", "source": "model_final.safetensors", ...}],
     "input_rules": {"min_size": 800, "max_size": 1333, "size_divisibility": 32,
                     "pixel_format": "RGB float 0-255, zero padding", ...},
     "graphs": {"automatic": {"file": "<name>.auto.onnx", "inputs": [...], "outputs": [...]},
                "prompt": {...}},
     "engines": {"automatic": {"file": "<name>.auto.engine", "sha256": "...", ...}, ...},
     "precision": "fp32"}

An INT8 export (``python -m export --int8``) has its own sidecar ``<name>.int8.json`` with
``"precision": "int8"`` and a ``"quantization"`` record (calibration set and its SHA-256);
its graphs have the same inputs and outputs as the fp32 ones. Everything but the format,
export id, graphs, engines and quantization record is the model's
:class:`~serving.model.card.ModelCard` (older sidecars are migrated when read).

Each ONNX file carries the same ``export_id`` in its metadata, so a sidecar from another export
is recognised. Thresholds used inside the graphs are fixed at export time: loading may raise
``score_threshold`` or lower ``max_detections`` (both are exact after the graph), other graph
settings need a new export.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import CheckpointError, InputError
from ..files import atomic_write
from ..inference.postprocess import Detections, PaddedDetections, PromptDetections
from ..model.card import ModelCard
from ..model_config import InferenceConfig, ModelConfig, config_to_dict
from .locate import SIDECAR_FORMAT, locate_model

GRAPH_KINDS = ("automatic", "prompt")
#: Input and output names of the automatic and box-prompted graphs (``export/wrapper.py``).
AUTO_INPUTS = ("images", "image_sizes")
AUTO_OUTPUTS = ("boxes", "scores", "labels", "masks", "num_detections")
PROMPT_INPUTS = ("images", "image_sizes", "boxes", "box_labels")
PROMPT_OUTPUTS = ("masks", "scores", "labels")
#: InferenceConfig fields compiled into the graphs (overriding them needs a re-export).
GRAPH_FIELDS = ("pre_nms_topk", "nms_threshold", "prompt_mu", "prompt_topk", "center_radius")
_SUFFIXES = (".auto.onnx", ".prompt.onnx", ".auto.engine", ".prompt.engine", ".onnx", ".engine",
             ".plan", ".trt", ".json")


@dataclass
class ExportSidecar:
    """A parsed sidecar. ``path`` is the JSON file; graph and engine files sit beside it.
    ``card``: the export's :class:`~serving.model.card.ModelCard` (its precision, input rules
    and history included)."""

    path: Path
    export_id: str
    card: ModelCard
    graphs: dict[str, dict[str, Any]]
    engines: dict[str, dict[str, Any]]
    #: For INT8: tool, options, calibration set (source, count, SHA-256), fp32 nodes.
    quantization: dict[str, Any] | None = None

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.card.class_names

    @property
    def model(self) -> ModelConfig:
        return self.card.model

    @property
    def inference(self) -> InferenceConfig:
        return self.card.inference

    @property
    def precision(self) -> str:
        """"fp32", or "int8" for graphs from ``python -m export --int8`` (ONNX Runtime QDQ)."""
        return self.card.precision

    @property
    def input_rules(self) -> dict[str, Any]:
        return dict(self.card.input_rules or {})

    def file(self, kind: str, engine: bool = False) -> Path:
        """Path of the ``kind`` ("automatic"/"prompt") ONNX graph, or its TensorRT engine."""
        table = self.engines if engine else self.graphs
        what = "TensorRT engine" if engine else "ONNX graph"
        if kind not in table:
            hint = "python -m export --format tensorrt" if engine else "python -m export"
            raise CheckpointError(f"{self.path}: lists no {kind} {what}; re-export with {hint}")
        return self.path.parent / table[kind]["file"]


def sidecar_path(path: str | os.PathLike) -> Path:
    """The sidecar of a model path: ``x.json`` for ``x.auto.onnx``, ``x.onnx``, ``x.engine``,
    or the path itself when it is a ``.json`` file."""
    path = Path(path)
    name = path.name
    for suffix in _SUFFIXES:
        if name.lower().endswith(suffix):
            return path.with_name(name[: -len(suffix)] + ".json")
    return path.with_name(name + ".json")


def input_rules(inference: InferenceConfig,
                static_shape: tuple[int, int, int] | None = None) -> dict[str, Any]:
    """An export's preprocessing contract: resize, padding, pixel format, prompt limit, and
    ``static_shape`` ([batch, height, width] of a ``--static`` export, else ``None``)."""
    return {
        "min_size": inference.min_size,
        "max_size": inference.max_size,
        "resize": "shorter side to min_size unless the longer side exceeds max_size",
        "size_divisibility": 32,
        "pixel_format": "RGB float32 0-255, not normalised; padding right/bottom with 0",
        "max_prompt_boxes": inference.max_prompt_boxes,
        "mask_stride": 4,
        "static_shape": None if static_shape is None else list(static_shape),
    }


def build_sidecar(*, export_id: str, card: ModelCard, graphs: dict[str, dict[str, Any]],
                  engines: dict[str, dict[str, Any]] | None = None,
                  quantization: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON content of a sidecar: format, export id, the ``card``'s fields
    (:meth:`ModelCard.to_json`), graphs, engines and an INT8 export's quantization record
    (written by ``export``; read by :func:`read_sidecar`)."""
    data = {"format": SIDECAR_FORMAT, **card.to_json(), "export_id": export_id,
            "graphs": graphs, "engines": engines or {}}
    if quantization is not None:
        data["quantization"] = quantization
    return data


def write_sidecar(path: str | os.PathLike, **fields: Any) -> Path:
    """Write :func:`build_sidecar`'s JSON to ``path`` atomically (the one sidecar writer)."""
    text = json.dumps(build_sidecar(**fields), indent=2)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return Path(path)


def read_sidecar(path: str | os.PathLike) -> ExportSidecar:
    """Read and check the sidecar belonging to ``path`` (see :func:`sidecar_path`; a folder:
    its export, :func:`serving.backends.locate.locate_model`)."""
    if Path(path).is_dir():
        path = locate_model(path).path
    side = sidecar_path(path)
    if not side.is_file():
        raise CheckpointError(
            f"{path}: its export sidecar {side.name} is missing; keep the .json written by "
            "python -m export next to the model files (or re-export)"
        )
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise CheckpointError(f"{side}: unreadable export sidecar ({reason}); re-export"
                              ) from None
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
        raise CheckpointError(
            f"{side}: not an export sidecar (no '{SIDECAR_FORMAT}' format field); pass the "
            ".json written by python -m export"
        )
    where = f"{side}: corrupt export sidecar"
    card = ModelCard.from_json({"input_rules": {}, **data}, where, "export")
    graphs, engines = data.get("graphs"), data.get("engines", {})
    if not isinstance(data.get("input_rules", {}), dict) or not isinstance(graphs, dict) or \
            not all(isinstance(g, dict) and isinstance(g.get("file"), str)
                    for g in graphs.values()):
        raise CheckpointError(f"{where}: 'input_rules' and 'graphs' must be objects, each graph "
                              "with its 'file'; re-export")
    if not isinstance(engines, dict) or not isinstance(data.get("export_id"), str):
        raise CheckpointError(f"{where}: 'engines' must be an object and 'export_id' text; "
                              "re-export")
    quantization = data.get("quantization")
    return ExportSidecar(side, data["export_id"], card, dict(graphs), dict(engines),
                         quantization if isinstance(quantization, dict) else None)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (engines are checked against the sidecar with it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_inference(sidecar: ExportSidecar, overrides: dict[str, Any]) -> InferenceConfig:
    """The sidecar's ``InferenceConfig`` with ``overrides``, refusing changes the graphs can't
    honour: ``score_threshold`` may only rise and ``max_detections`` only fall (both applied
    exactly after the graph); ``GRAPH_FIELDS`` must stay as exported."""
    base = sidecar.inference
    try:
        cfg = InferenceConfig(**{**config_to_dict(base), **overrides})
    except TypeError as exc:
        raise InputError(f"inference overrides: {exc}") from None
    for name in GRAPH_FIELDS:
        if getattr(cfg, name) != getattr(base, name):
            raise InputError(
                f"{name}={getattr(cfg, name)} differs from the exported graph's "
                f"{getattr(base, name)}; re-export with that setting"
            )
    if cfg.score_threshold < base.score_threshold:
        raise InputError(
            f"score_threshold={cfg.score_threshold} is below the exported "
            f"{base.score_threshold}; only higher thresholds can be applied, or re-export"
        )
    if cfg.max_detections > base.max_detections:
        raise InputError(
            f"max_detections={cfg.max_detections} exceeds the exported {base.max_detections}; "
            "re-export with --max-detections"
        )
    return cfg


def graph_detections(outputs: Sequence[Tensor], cfg: InferenceConfig,
                     exported: InferenceConfig) -> list[Detections]:
    """The automatic graph's outputs -> one :class:`Detections` per image.

    Args:
        outputs: ``boxes`` (B, K, 4), ``scores`` (B, K), ``labels`` (B, K), ``masks``
            (B, K, H/4, W/4), ``num_detections`` (B,): a
            :class:`~serving.inference.postprocess.PaddedDetections` (scores sorted descending).
        cfg: the serving config; exported: the config the graph was exported with. A lower
            ``cfg.max_detections`` keeps the first slots, a higher ``cfg.score_threshold``
            keeps ``p > t`` i.e. ``score > sqrt(t)``: exactly what a graph exported with them
            returns.
    """
    padded = PaddedDetections(*outputs)
    num = padded.num.long().clamp(max=cfg.max_detections)
    if cfg.score_threshold > exported.score_threshold:
        num = torch.minimum(num, (padded.scores > cfg.score_threshold ** 0.5).sum(dim=1))
    return padded._replace(num=num).unpad()


def check_image_batch(images: Tensor, image_sizes: list[tuple[int, int]]) -> None:
    """Input checks shared by exported backends (shapes the graphs were built for)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise InputError(f"images: expected (B, 3, H, W), got {tuple(images.shape)}")
    if images.shape[-2] % 32 or images.shape[-1] % 32:
        raise InputError(f"images: H and W must be multiples of 32, got {tuple(images.shape)}")
    if len(image_sizes) != images.shape[0]:
        raise InputError(f"image_sizes: {len(image_sizes)} sizes for {images.shape[0]} images")


def as_torch(array: Any, device: torch.device) -> Tensor:
    """numpy array -> torch tensor on ``device`` (no copy on CPU)."""
    return torch.from_numpy(array).to(device)


class StaticShapeBackend:
    """Runs a backend whose graphs have one fixed input shape (an export with ``--static``).

    Images are zero-padded on the right and bottom to the exported (H, W) and batches are
    filled up (with blank 32x32 images) or split to the exported batch size. The outputs of the
    real images are returned unchanged: masks are at stride 4 of the larger canvas, which the
    ``Segmenter`` crops to each resized image as usual. To compare with PyTorch, wrap the torch
    backend in the same class so both see the same canvas.
    """

    def __init__(self, inner: Any, batch: int, height: int, width: int) -> None:
        self.inner = inner
        self.name = inner.name
        self.device = inner.device
        self.batch, self.height, self.width = batch, height, width

    def _canvas(self, images: Tensor, sizes: list[tuple[int, int]]):
        h, w = images.shape[-2:]
        if h > self.height or w > self.width:
            raise InputError(
                f"images: padded size {h}x{w} exceeds the static export size "
                f"{self.height}x{self.width}; lower max_size or re-export with --dynamic"
            )
        for start in range(0, images.shape[0], self.batch):
            part = images[start:start + self.batch]
            canvas = part.new_zeros((self.batch, 3, self.height, self.width))
            canvas[: part.shape[0], :, :h, :w] = part
            part_sizes = list(sizes[start:start + self.batch])
            n = len(part_sizes)
            yield start, n, canvas, part_sizes + [(32, 32)] * (self.batch - n)

    def detect(self, images: Tensor, image_sizes: list[tuple[int, int]]) -> list[Detections]:
        out: list[Detections] = []
        for _, n, canvas, sizes in self._canvas(images, image_sizes):
            out += self.inner.detect(canvas, sizes)[:n]
        return out

    def segment_boxes(self, images: Tensor, image_sizes: list[tuple[int, int]], boxes: Tensor,
                      labels: Tensor) -> PromptDetections:
        parts = []
        for start, n, canvas, sizes in self._canvas(images, image_sizes):
            bx = boxes[start:start + n]
            lb = labels[start:start + n]
            if n < self.batch:  # blank images get copies of the first row's boxes
                fill = self.batch - n
                bx = torch.cat((bx, bx[:1].expand(fill, -1, -1)))
                lb = torch.cat((lb, lb[:1].expand(fill, -1)))
            res = self.inner.segment_boxes(canvas, sizes, bx, lb)
            parts.append(PromptDetections(res.mask_probs[:n], res.scores[:n], res.labels[:n]))
        return PromptDetections(*(torch.cat(t) for t in zip(*parts)))
