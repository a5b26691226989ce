"""Export a checkpoint to two ONNX graphs (automatic and box-prompted) plus a JSON sidecar.

>>> result = export_onnx("runs/quickstart/model_final.safetensors", "exported/")
>>> result.paths   # [exported/model_final.auto.onnx, exported/model_final.prompt.onnx, .json]

Both graphs go through ``torch.onnx.export``'s dynamo exporter (``torch.export`` +
onnxscript), PyTorch's default and only maintained ONNX exporter. Batch, image height/width and
the number of prompt boxes are dynamic unless ``dynamic=False``.
"""

from __future__ import annotations

import math
import os
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from serving.backends.exported import input_rules, write_sidecar
from serving.errors import CheckpointError, InputError
from serving.files import atomic_write, check_writable_dir
from serving.model import CondInst
from serving.model.card import ModelCard, Provenance
from serving.model.model_file import load_checkpoint
from serving.model_config import InferenceConfig, config_to_dict

from .onnx_nms import ONNX_TRANSLATIONS
from .wrapper import (
    AUTO_INPUTS,
    AUTO_OUTPUTS,
    PROMPT_INPUTS,
    PROMPT_OUTPUTS,
    AutomaticGraph,
    PromptGraph,
)

MIN_OPSET = 17
DEFAULT_OPSET = 18
#: Locations of the smallest padded input (32x32): 16 + 4 + 1 + 1 + 1.
_MIN_LOCATIONS = 23


@dataclass
class ExportResult:
    """Files written by an export. ``paths`` lists all of them."""

    sidecar: Path
    graphs: dict[str, Path] = field(default_factory=dict)
    engines: dict[str, Path] = field(default_factory=dict)
    unsupported_tensorrt_ops: list[str] = field(default_factory=list)

    @property
    def paths(self) -> list[Path]:
        return [*self.graphs.values(), *self.engines.values(), self.sidecar]


def _load(source: Any) -> tuple[CondInst, ModelCard, str]:
    """A checkpoint path or a ``(model, ModelCard)`` pair -> (model, card, base name)."""
    if isinstance(source, tuple):
        model, info = source
        return model.eval(), info, "model"
    path = Path(source)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: file not found; check --checkpoint")
    model, info = load_checkpoint(path)
    return model, info, path.stem


def _sample_inputs(batch: int, height: int, width: int, boxes: int):
    """Export-time example inputs. Every traced size is >= 2 so that no dimension of the
    network (down to P7 at stride 128) is specialised to 1."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, height, width, generator=gen) * 255
    sizes = torch.tensor([[max(height - 32 * (i % 2), 32), max(width - 16 * (i % 3), 32)]
                          for i in range(batch)])
    x1 = torch.rand(batch, boxes, 2, generator=gen) * torch.tensor([width / 2, height / 2])
    wh = 16 + torch.rand(batch, boxes, 2, generator=gen) * torch.tensor([width / 2, height / 2])
    prompt = torch.cat((x1, x1 + wh), dim=-1)
    labels = torch.full((batch, boxes), -1, dtype=torch.int64)
    labels[:, 0] = 0
    return images, sizes, prompt, labels


def _dynamic_shapes(inputs: tuple[str, ...], dynamic: bool) -> dict[str, Any] | None:
    """``torch.export`` dims: batch and image size (in steps of 32) when ``dynamic``, and the
    number of prompt boxes always."""
    dims: dict[str, Any] = {name: None for name in inputs}
    batch = torch.export.Dim("batch", min=1, max=1024)
    if dynamic:
        h32 = torch.export.Dim("height_32", min=1, max=512)
        w32 = torch.export.Dim("width_32", min=1, max=512)
        dims.update({"images": {0: batch, 2: 32 * h32, 3: 32 * w32}, "image_sizes": {0: batch}})
    if "boxes" in inputs:
        num = torch.export.Dim("num_boxes", min=1, max=4096)
        dims["boxes"] = {0: batch, 1: num} if dynamic else {1: num}
        dims["box_labels"] = dims["boxes"]
    return dims if any(dims.values()) else None


def _export_graph(module: nn.Module, args: tuple, names: tuple[tuple[str, ...], tuple[str, ...]],
                  opset: int, dynamic: bool):
    """Run ``torch.onnx.export`` (the dynamo exporter: ``torch.export`` + onnxscript) and
    return the ``onnx.ModelProto``."""
    inputs, outputs = names
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, args, dynamo=True, opset_version=opset, input_names=list(inputs),
            output_names=list(outputs), dynamic_shapes=_dynamic_shapes(inputs, dynamic),
            custom_translation_table=ONNX_TRANSLATIONS, external_data=False,
            optimize=True, verbose=False, report=False,
        )
    return program.model_proto


def _finish(proto: Any, path: Path, kind: str, export_id: str) -> None:
    """Stamp metadata, write atomically and run the ONNX checker."""
    import onnx

    for key, value in {"format": "sim-condinst-export", "graph": kind,
                       "export_id": export_id}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "sim-boxseg export"
    atomic_write(path, lambda tmp: onnx.save(proto, tmp))
    onnx.checker.check_model(str(path))


def _inference_config(info: ModelCard, max_detections: int | None) -> InferenceConfig:
    """The checkpoint's inference settings with ``max_detections`` overridden (the K baked into
    the automatic graph); refuses settings the graphs cannot hold."""
    overrides: dict[str, Any] = {}
    if max_detections is not None:
        if max_detections < 1:
            raise InputError(f"max_detections={max_detections}: must be at least 1")
        overrides["max_detections"] = int(max_detections)
    cfg = InferenceConfig(**{**config_to_dict(info.inference), **overrides})
    if cfg.prompt_topk > _MIN_LOCATIONS:
        raise InputError(
            f"prompt_topk={cfg.prompt_topk} exceeds the {_MIN_LOCATIONS} locations of the "
            "smallest input; the graph needs prompt_topk <= 23"
        )
    return cfg


def _trace_shape(cfg: InferenceConfig, dynamic: bool, image_size: tuple[int, int] | None,
                 batch_size: int) -> tuple[int, int, int]:
    """(batch, height, width) of the sample inputs: 2x256x320 for a dynamic export (any shape
    runs later), else the fixed shape, ``image_size`` defaulting to max_size rounded up to 32."""
    if dynamic:
        return 2, 256, 320
    side = math.ceil(cfg.max_size / 32) * 32
    height, width = image_size or (side, side)
    if height % 32 or width % 32 or batch_size < 1:
        raise InputError(
            f"image_size={height}x{width}, batch_size={batch_size}: need multiples of 32 and a "
            "batch of at least 1"
        )
    return batch_size, height, width


def _check_tensorrt(result: ExportResult) -> None:
    """Warn about, and record in ``result``, operators TensorRT's ONNX parser lacks."""
    from .tensorrt import check_tensorrt_ops

    for kind, path in result.graphs.items():
        missing = check_tensorrt_ops(path)
        if missing:
            warnings.warn(f"{path.name}: operators TensorRT's ONNX parser does not support: "
                          f"{', '.join(missing)}", stacklevel=3)
        result.unsupported_tensorrt_ops += [f"{kind}:{op}" for op in missing]


def export_onnx(source: str | os.PathLike | tuple[CondInst, ModelCard],
                out_dir: str | os.PathLike, *, name: str | None = None,
                opset: int = DEFAULT_OPSET, max_detections: int | None = None,
                dynamic: bool = True, image_size: tuple[int, int] | None = None,
                batch_size: int = 1, check_tensorrt: bool = True) -> ExportResult:
    """Write ``<name>.auto.onnx``, ``<name>.prompt.onnx`` and the sidecar ``<name>.json``.

    Args:
        source: a ``.safetensors`` checkpoint, or ``(model, info)`` from ``load_checkpoint``.
        out_dir: output folder (created). name: file stem (default: the checkpoint's stem).
        opset: ONNX opset, at least 17.
        max_detections: K of the automatic graph (default: the checkpoint's setting).
        dynamic: dynamic batch and image size (default). ``False`` fixes both to
            ``batch_size`` x ``image_size`` (default: max_size x max_size, rounded up to 32);
            the number of prompt boxes stays dynamic.
        check_tensorrt: warn when a graph uses an operator TensorRT's ONNX parser lacks.

    Returns:
        :class:`ExportResult` with the written paths and any TensorRT-unsupported operators.
    """
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise InputError(f"opset={opset}: must be at least {MIN_OPSET}; try --opset 18")
    out = check_writable_dir(out_dir)
    model, info, stem = _load(source)
    name = name or stem
    cfg = _inference_config(info, max_detections)
    batch, height, width = _trace_shape(cfg, dynamic, image_size, batch_size)
    images, sizes, boxes, labels = _sample_inputs(batch, height, width, 3)
    export_id = uuid.uuid4().hex
    specs = {
        "automatic": (AutomaticGraph(model, cfg).eval(), (images, sizes),
                      (AUTO_INPUTS, AUTO_OUTPUTS)),
        "prompt": (PromptGraph(model, cfg).eval(), (images, sizes, boxes, labels),
                   (PROMPT_INPUTS, PROMPT_OUTPUTS)),
    }
    result = ExportResult(sidecar=out / f"{name}.json")
    graphs_meta = {}
    for kind, (module, args, names) in specs.items():
        path = out / f"{name}.{'auto' if kind == 'automatic' else 'prompt'}.onnx"
        with torch.no_grad():
            proto = _export_graph(module, args, names, opset, dynamic)
        _finish(proto, path, kind, export_id)
        result.graphs[kind] = path
        graphs_meta[kind] = {"file": path.name, "inputs": list(names[0]),
                             "outputs": list(names[1])}
    if check_tensorrt:
        _check_tensorrt(result)
    step = Provenance.now("export onnx", None if isinstance(source, tuple) else Path(source).name,
                          opset=opset, exporter="dynamo", torch_version=torch.__version__,
                          dynamic=dynamic)
    card = info.step(step, inference=cfg, precision="fp32",
                     input_rules=input_rules(cfg, None if dynamic else (batch, height, width)))
    write_sidecar(result.sidecar, export_id=export_id, card=card, graphs=graphs_meta)
    return result
