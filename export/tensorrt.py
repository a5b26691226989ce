"""TensorRT engines from the exported ONNX graphs (TensorRT 10 Python API), and a check of
the graphs' operators against the list TensorRT's ONNX parser supports.

``tensorrt`` is imported lazily: :func:`check_tensorrt_ops` needs only ``onnx`` and the
operator list kept in ``export/data/tensorrt_onnx_ops.json`` (with its source and version).

INT8 engines come two ways, both from the same calibration images (:mod:`export.int8_calibration`):

- **explicit** (the default, ``python -m export --format tensorrt --int8``): the engine is built
  from an INT8 QDQ export (:func:`export.quantize.quantize_export` with symmetric int8
  activations, the only Q/DQ form TensorRT accepts) as a *strongly typed* network, so the
  Q/DQ placement decides what runs in int8 and NMS, box decoding and the mask head stay fp32,
  exactly as on the CPU. This is TensorRT's supported path: implicit calibration is
  deprecated since TensorRT 10.1 and removed (with ``BuilderFlag.INT8``) in TensorRT 11.
- **implicit** (``--int8-calibrator``, TensorRT 10 only): the fp32 graphs are calibrated by
  TensorRT itself with :func:`make_entropy_calibrator` (an ``IInt8EntropyCalibrator2`` fed by
  :class:`CalibrationBatches`) and ``BuilderFlag.INT8``; TensorRT then picks int8 per layer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from serving.backends.exported import file_sha256, read_sidecar, write_sidecar
from serving.errors import CheckpointError, InputError
from serving.files import atomic_write
from serving.model.card import Provenance

OPS_FILE = Path(__file__).parent / "data" / "tensorrt_onnx_ops.json"
#: TensorRT's TopK limit (operators.md: "`K` input must be less than 3840").
TOPK_LIMIT = 3840


@lru_cache(maxsize=1)
def tensorrt_op_table() -> dict[str, Any]:
    """The parser's operator table: {"source", "tensorrt_version", "supported", ...}."""
    return json.loads(OPS_FILE.read_text(encoding="utf-8"))


def check_tensorrt_ops(onnx_path: str | os.PathLike) -> list[str]:
    """Operators of an ONNX model that TensorRT's ONNX parser does not support.

    Checks every node (including sub-graphs) against the supported list; nodes of a
    non-default domain are reported as ``domain::Op``; a ``TopK`` with a constant K at or
    above TensorRT's limit is reported as ``TopK(K=...)``.

    Returns:
        Sorted list of unsupported operator names; empty when the graph can be parsed.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    supported = set(tensorrt_op_table()["supported"])
    constants = {init.name: init for init in model.graph.initializer}
    problems: set[str] = set()

    def visit(graph: Any) -> None:
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute:
                constants[node.output[0]] = node.attribute[0].t
            if node.domain not in ("", "ai.onnx"):
                problems.add(f"{node.domain}::{node.op_type}")
            elif node.op_type not in supported:
                problems.add(node.op_type)
            elif node.op_type == "TopK" and len(node.input) > 1 and node.input[1] in constants:
                k = int(numpy_helper.to_array(constants[node.input[1]]).reshape(-1)[0])
                if k >= TOPK_LIMIT:
                    problems.add(f"TopK(K={k})")
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                for sub in attr.graphs:
                    visit(sub)

    visit(model.graph)
    return sorted(problems)


def graph_op_types(onnx_path: str | os.PathLike) -> list[str]:
    """Sorted operator types used by an ONNX model's main graph."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return sorted({node.op_type for node in model.graph.node})


def import_tensorrt() -> Any:
    """``import tensorrt`` with a one-line fix when it is missing."""
    try:
        import tensorrt
    except ImportError:
        raise InputError(
            "tensorrt is not installed: pip install tensorrt (needs an NVIDIA GPU and CUDA); "
            "the ONNX export works without it"
        ) from None
    return tensorrt


@dataclass
class ShapeProfile:
    """Optimisation-profile shapes (min, opt, max) for the dynamic inputs.

    ``batch``, ``height``, ``width`` and ``boxes`` are (min, opt, max) triples; height and
    width are padded input sizes (multiples of 32).
    """

    batch: tuple[int, int, int] = (1, 1, 8)
    height: tuple[int, int, int] = (32, 800, 1344)
    width: tuple[int, int, int] = (32, 1344, 1344)
    boxes: tuple[int, int, int] = (1, 10, 256)

    def shapes(self, name: str) -> tuple[tuple[int, ...], ...]:
        """(min, opt, max) shapes of input ``name``."""
        b, h, w, m = self.batch, self.height, self.width, self.boxes
        table = {
            "images": [(b[i], 3, h[i], w[i]) for i in range(3)],
            "image_sizes": [(b[i], 2) for i in range(3)],
            "boxes": [(b[i], m[i], 4) for i in range(3)],
            "box_labels": [(b[i], m[i]) for i in range(3)],
        }
        return tuple(table[name])


def default_profile(sidecar: Any) -> ShapeProfile:
    """Profile from the export's input rules: static shapes as exported, else up to
    max_size x max_size, batch 8 and ``max_prompt_boxes`` prompt boxes."""
    rules = sidecar.input_rules
    boxes = (1, min(10, rules["max_prompt_boxes"]), rules["max_prompt_boxes"])
    if rules.get("static_shape"):
        b, h, w = rules["static_shape"]
        return ShapeProfile((b, b, b), (h, h, h), (w, w, w), boxes)
    side = -(-rules["max_size"] // 32) * 32
    short = -(-rules["min_size"] // 32) * 32
    return ShapeProfile((1, 1, 8), (32, short, side), (32, side, side), boxes)


def _build_one(trt: Any, onnx_path: Path, engine_path: Path, *, fp16: bool, workspace_gb: float,
               profile: ShapeProfile, timing_cache: Path | None, strongly_typed: bool = False,
               calibrator: Any = None, calibration_shapes: dict | None = None) -> None:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # Explicit batch is the only mode in TensorRT 10; a QDQ graph is built strongly typed.
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise CheckpointError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if fp16 and not strongly_typed:  # a strongly typed network takes its types from the graph
        config.set_flag(trt.BuilderFlag.FP16)
    opt = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        opt.set_shape(name, *profile.shapes(name))
    config.add_optimization_profile(opt)
    if calibrator is not None:  # implicit INT8 (TensorRT 10; deprecated since 10.1)
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = calibrator
        calib = builder.create_optimization_profile()
        for name, shape in (calibration_shapes or {}).items():
            calib.set_shape(name, shape, shape, shape)
        config.set_calibration_profile(calib)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CheckpointError(f"TensorRT failed to build an engine from {onnx_path.name}; "
                              "see the TensorRT log above")
    atomic_write(engine_path, lambda tmp: Path(tmp).write_bytes(bytes(serialized)))
    if timing_cache is not None:
        data = bytes(config.get_timing_cache().serialize())
        atomic_write(timing_cache, lambda tmp: Path(tmp).write_bytes(data))


def engine_precision(sidecar: Any, fp16: bool, calibration: Any) -> str:
    """The engine's precision label; refuses combinations TensorRT cannot build."""
    if sidecar.precision == "int8":
        activations = (sidecar.quantization or {}).get("activations", "")
        if not activations.startswith("int8 symmetric"):
            raise InputError(
                f"{sidecar.path.name}: INT8 export with {activations or 'unknown'} activations; "
                "TensorRT needs symmetric int8 Q/DQ: re-quantise with --int8 --format tensorrt"
            )
        if calibration is not None:
            raise InputError(f"{sidecar.path.name} is already INT8 (explicit Q/DQ); build it "
                             "without a calibrator, or calibrate the fp32 export")
        return "int8 (explicit Q/DQ)"
    if calibration is not None:
        return "int8 (calibrated" + (", fp16)" if fp16 else ")")
    return "fp16" if fp16 else "fp32"


def build_tensorrt_engine(export_path: str | os.PathLike, *, fp16: bool = False,
                          workspace_gb: float = 4.0, profile: ShapeProfile | None = None,
                          timing_cache: str | os.PathLike | None = None,
                          int8_calibration: Any = None) -> dict[str, Path]:
    """Build ``<name>.auto.engine`` and ``<name>.prompt.engine`` next to an ONNX export and
    record them (with SHA-256, precision and profile) in its sidecar.

    Args:
        export_path: the export's sidecar ``.json`` or one of its ``.onnx`` files. An INT8
            export with symmetric activations (``quantize_export(..., symmetric=True)``) is
            built as a strongly typed network: explicit INT8 from its Q/DQ nodes.
        fp16: allow FP16 kernels (``BuilderFlag.FP16``); default FP32 (ignored for explicit
            INT8, whose types come from the graph).
        workspace_gb: builder workspace memory pool limit.
        profile: optimisation-profile shapes; default from the sidecar (:func:`default_profile`).
        timing_cache: file to load the timing cache from (if present) and save it to.
        int8_calibration: a :class:`export.int8_calibration.CalibrationSet` for *implicit*
            INT8 of an fp32 export (``IInt8EntropyCalibrator2``; TensorRT 10 only). The
            calibration cache is kept next to each engine as ``<engine>.calib``.

    Returns:
        {"automatic": engine path, "prompt": engine path}.
    """
    sidecar = read_sidecar(export_path)
    precision = engine_precision(sidecar, fp16, int8_calibration)
    trt = import_tensorrt()
    profile = profile or default_profile(sidecar)
    cache = Path(timing_cache) if timing_cache else None
    engines: dict[str, Path] = {}
    records = {}
    for kind in ("automatic", "prompt"):
        onnx_path = sidecar.file(kind)
        engine = onnx_path.with_name(onnx_path.name[: -len(".onnx")] + ".engine")
        calibrator, shapes = None, None
        if int8_calibration is not None:
            shapes = calibration_shapes(sidecar, list(sidecar.graphs[kind]["inputs"]))
            batches = CalibrationBatches(int8_calibration, sidecar, kind, shapes,
                                         engine.with_suffix(".calib"))
            calibrator = make_entropy_calibrator(trt, batches)
        _build_one(trt, onnx_path, engine, fp16=fp16, workspace_gb=workspace_gb,
                   profile=profile, timing_cache=cache,
                   strongly_typed=sidecar.precision == "int8", calibrator=calibrator,
                   calibration_shapes=shapes)
        engines[kind] = engine
        records[kind] = {"file": engine.name, "sha256": file_sha256(engine),
                         "precision": precision, "tensorrt_version": trt.__version__,
                         "profile": {k: list(v) for k, v in vars(profile).items()}}
        if int8_calibration is not None:
            records[kind]["calibration"] = int8_calibration.to_dict()
    step = Provenance.now("export tensorrt", sidecar.file("automatic").name,
                          precision=precision, tensorrt_version=trt.__version__)
    write_sidecar(sidecar.path, export_id=sidecar.export_id, card=sidecar.card.step(step),
                  graphs=sidecar.graphs, engines=records, quantization=sidecar.quantization)
    return engines


class CalibrationBatches:
    """Calibration inputs of one graph for TensorRT, as contiguous numpy arrays of fixed shapes.

    TensorRT calibrates a dynamic-shape network at one shape (its calibration profile), so
    every image is prepared as for serving and zero-padded to ``shapes["images"]`` (B, 3, H, W);
    prompt boxes are padded to ``shapes["boxes"][1]`` rows by repeating the last box. The
    calibration cache is read from and written to ``cache`` (if given).
    """

    def __init__(self, calibration: Any, sidecar: Any, kind: str,
                 shapes: dict[str, tuple[int, ...]], cache: Path | None = None) -> None:
        from .int8_calibration import calibration_feeds

        self.shapes = shapes
        self.cache = cache
        self._feeds = calibration_feeds(calibration, sidecar, kind)
        self.count = 0

    def _pad(self, name: str, value: Any) -> Any:
        import numpy as np

        shape = self.shapes[name]
        out = np.zeros(shape, dtype=value.dtype)
        if name == "box_labels":
            out[:] = -1
        if name in ("boxes", "box_labels"):
            rows = min(value.shape[1], shape[1])
            out[:1, :rows] = value[:1, :rows]
            out[:1, rows:] = value[:1, rows - 1: rows]
        elif name == "image_sizes":
            out[:] = 32
            out[:1] = value[:1]
        else:
            h, w = min(value.shape[2], shape[2]), min(value.shape[3], shape[3])
            out[:1, :, :h, :w] = value[:1, :, :h, :w]
        return np.ascontiguousarray(out)

    def next_batch(self) -> dict[str, Any] | None:
        """The next padded input dict, or None when the images are used up."""
        feed = next(self._feeds, None)
        if feed is None:
            return None
        self.count += 1
        return {name: self._pad(name, feed[name]) for name in self.shapes}

    def read_cache(self) -> bytes | None:
        return self.cache.read_bytes() if self.cache and self.cache.is_file() else None

    def write_cache(self, data: bytes) -> None:
        if self.cache is not None:
            atomic_write(self.cache, lambda tmp: Path(tmp).write_bytes(data))


def make_entropy_calibrator(trt: Any, batches: CalibrationBatches) -> Any:
    """An ``IInt8EntropyCalibrator2`` (TensorRT 10, deprecated since 10.1) over ``batches``;
    each batch is copied to CUDA memory that stays alive until the next one."""
    import torch

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.buffers: dict[str, Any] = {}

        def get_batch_size(self) -> int:
            return 1  # explicit-batch network: the batch is part of the input shapes

        def get_batch(self, names: list[str]) -> list[int] | None:
            feed = batches.next_batch()
            if feed is None:
                return None
            self.buffers = {n: torch.from_numpy(feed[n]).cuda() for n in names}
            return [int(self.buffers[n].data_ptr()) for n in names]

        def read_calibration_cache(self) -> bytes | None:
            return batches.read_cache()

        def write_calibration_cache(self, cache: Any) -> None:
            batches.write_cache(bytes(cache))

    return EntropyCalibrator()


def calibration_shapes(sidecar: Any, names: list[str], batch: int = 1,
                       boxes: int = 10) -> dict[str, tuple[int, ...]]:
    """The fixed input shapes TensorRT calibrates at: a max_size x max_size canvas (rounded up
    to 32) that any resized image fits, or the static export shape."""
    rules = sidecar.input_rules
    if rules.get("static_shape"):
        batch, height, width = rules["static_shape"]
    else:
        height = width = -(-rules["max_size"] // 32) * 32
    table = {"images": (batch, 3, height, width), "image_sizes": (batch, 2),
             "boxes": (batch, boxes, 4), "box_labels": (batch, boxes)}
    return {name: table[name] for name in names}
