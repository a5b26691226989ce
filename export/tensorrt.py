"""TensorRT engines from the exported ONNX graphs (TensorRT 10 Python API), and a check of
the graphs' operators against the list TensorRT's ONNX parser supports.

``tensorrt`` is imported lazily: :func:`check_tensorrt_ops` needs only ``onnx`` and the
operator list kept in ``export/data/tensorrt_onnx_ops.json`` (with its source and version).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from serving.backends.exported import file_sha256, read_sidecar
from serving.errors import CheckpointError, InputError
from serving.files import atomic_write

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
               profile: ShapeProfile, timing_cache: Path | None) -> None:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise CheckpointError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    opt = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        opt.set_shape(name, *profile.shapes(name))
    config.add_optimization_profile(opt)
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


def build_tensorrt_engine(export_path: str | os.PathLike, *, fp16: bool = False,
                          workspace_gb: float = 4.0, profile: ShapeProfile | None = None,
                          timing_cache: str | os.PathLike | None = None) -> dict[str, Path]:
    """Build ``<name>.auto.engine`` and ``<name>.prompt.engine`` next to an ONNX export and
    record them (with SHA-256, precision and profile) in its sidecar.

    Args:
        export_path: the export's sidecar ``.json`` or one of its ``.onnx`` files.
        fp16: allow FP16 kernels (``BuilderFlag.FP16``); default FP32.
        workspace_gb: builder workspace memory pool limit.
        profile: optimisation-profile shapes; default from the sidecar (:func:`default_profile`).
        timing_cache: file to load the timing cache from (if present) and save it to.

    Returns:
        {"automatic": engine path, "prompt": engine path}.
    """
    trt = import_tensorrt()
    sidecar = read_sidecar(export_path)
    profile = profile or default_profile(sidecar)
    cache = Path(timing_cache) if timing_cache else None
    engines: dict[str, Path] = {}
    records = {}
    for kind in ("automatic", "prompt"):
        onnx_path = sidecar.file(kind)
        engine = onnx_path.with_name(onnx_path.name[: -len(".onnx")] + ".engine")
        _build_one(trt, onnx_path, engine, fp16=fp16, workspace_gb=workspace_gb,
                   profile=profile, timing_cache=cache)
        engines[kind] = engine
        records[kind] = {"file": engine.name, "sha256": file_sha256(engine),
                         "precision": "fp16" if fp16 else "fp32",
                         "tensorrt_version": trt.__version__,
                         "profile": {k: list(v) for k, v in vars(profile).items()}}
    data = json.loads(sidecar.path.read_text(encoding="utf-8"))
    data["engines"] = records
    text = json.dumps(data, indent=2)
    atomic_write(sidecar.path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return engines
