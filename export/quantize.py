"""INT8 ONNX graphs from an fp32 export: ONNX Runtime static quantisation (QDQ, per-channel).

>>> result = quantize_export("exported/model.json", "data/train_images/")
>>> result.sidecar          # exported/model.int8.json, next to model.int8.{auto,prompt}.onnx
>>> Segmenter.load("exported/model.int8.auto.onnx").predict("image.jpg")

Works on the ONNX files ``python -m export`` wrote, whichever exporter made them. Each graph
is calibrated on the user's images (:mod:`export.calibration`, the serving preprocessing) and
quantised with ``onnxruntime.quantization.quantize_static``: QDQ format, uint8 activations
(asymmetric, the fast choice for x86 VNNI kernels) and int8 per-channel weights.

What is quantised is chosen on the graph's structure, not on node names: the **network** is
every node a convolution depends on, plus the convolutions. Inside it, convolutions, their
Relu/Clip, max-pooling, resizing and the Adds of two activations (residuals, FPN sums) run in
int8; GroupNorm stays fp32. Everything after the last convolutions stays fp32: box decoding,
scores, top-k, NMS, the IoU weighting of prompts, the dynamic mask head (unless
``quantize_mask_head``) and, by default, the prediction convolutions themselves whose outputs
feed those (``keep_prediction_convs``; box regression, class logits, controller weights).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.backends.exported import ExportSidecar, read_sidecar
from serving.errors import InputError
from serving.files import atomic_write

from .calibration import (
    DEFAULT_CALIBRATION_COUNT,
    CalibrationSet,
    calibration_feeds,
    load_calibration_set,
)
from .onnx import ExportResult

METHODS = ("minmax", "percentile", "entropy")
#: Operator types quantised inside the network (Add only when both inputs are activations).
NETWORK_OPS = ("Conv", "Relu", "Clip", "MaxPool", "Resize", "Add")


@dataclass
class QuantizeOptions:
    """How to quantise. Defaults are what ``python -m export --int8`` uses.

    ``method``: calibration (minmax, percentile = 99.999th, entropy); ``keep_prediction_convs``:
    the convolutions that produce class logits, box regression, centerness, controller
    weights and mask features stay fp32; ``quantize_mask_head``: also run the dynamic mask
    head's MatMuls in int8; ``symmetric``: int8 activations with zero point 0 (what TensorRT's
    explicit quantisation needs) instead of uint8 asymmetric (faster on x86 CPUs).
    """

    method: str = "minmax"
    keep_prediction_convs: bool = True
    quantize_mask_head: bool = False
    symmetric: bool = False
    per_channel: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class GraphPlan:
    """What to quantise in one graph (node names).

    ``region``: the nodes handed to the quantiser, closed under dependencies (the network, or
    the whole graph with ``quantize_mask_head``); ``quantize``: the nodes inside it that run in
    int8; ``kept_convs``: prediction convolutions kept in fp32.
    """

    region: set[str] = field(default_factory=set)
    quantize: list[str] = field(default_factory=list)
    kept_convs: list[str] = field(default_factory=list)
    op_types: list[str] = field(default_factory=list)


def optimize_model(path: str | os.PathLike) -> Any:
    """The graph at ``path`` after ONNX Runtime's *basic* optimisations (standard ONNX
    operators only): constants folded, batch norms (exported as Mul/Add) folded into their
    convolutions, identities removed. Quantising before this would put Q/DQ pairs between a
    convolution and its folded batch norm and keep both in fp32."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(Path(tmp) / "basic.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)


def region_signature(model: Any) -> str:
    """SHA-256 of a (sub-)model's computation: nodes with their attributes and inputs, where
    initializers count by content rather than name (two exports of one network name their
    constants differently)."""
    from onnx import numpy_helper

    digest = hashlib.sha256(repr([i.name for i in model.graph.input]).encode())
    inits = {}
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        inits[init.name] = hashlib.sha256(
            f"{array.dtype}{array.shape}".encode() + array.tobytes()).hexdigest()
    entries = []
    for node in model.graph.node:  # order-free: names and edges define the graph
        inputs = [inits.get(name, name) for name in node.input]
        attrs = [a.SerializeToString() for a in node.attribute]
        entries.append(repr((node.op_type, node.name, inputs, list(node.output), attrs)))
    for entry in sorted(entries):
        digest.update(entry.encode())
    return digest.hexdigest()


def prepare_model(model: Any) -> Any:
    """Name unnamed nodes and turn ``Identity(initializer)`` into initializers (the
    TorchScript exporter shares equal constants that way; the quantiser needs weights and
    biases as initializers). Modifies and returns ``model`` (an ``onnx.ModelProto``)."""
    import onnx

    inits = {init.name: init for init in model.graph.initializer}
    used = {n.name for n in model.graph.node if n.name}
    keep = []
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_unnamed_{i}"
            while node.name in used:
                node.name += "_"
            used.add(node.name)
        if node.op_type == "Identity" and node.input[0] in inits:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            model.graph.initializer.append(copy)
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


def _ancestors(nodes: list[Any], seeds: list[Any]) -> set[str]:
    """Names of ``seeds`` and every node they depend on."""
    producer = {out: node for node in nodes for out in node.output}
    seen: set[str] = set()
    stack = list(seeds)
    while stack:
        node = stack.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        stack += [producer[name] for name in node.input if name in producer]
    return seen


def _float_tensors(model: Any) -> set[str]:
    """Names of the float32 tensors of ``model`` (ONNX shape inference)."""
    import onnx

    graph = onnx.shape_inference.infer_shapes(model).graph
    infos = [*graph.value_info, *graph.input, *graph.output]
    floats = {vi.name for vi in infos if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    return floats | {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}


def plan_graph(model: Any, options: QuantizeOptions) -> GraphPlan:
    """Select the nodes to quantise (see the module docstring)."""
    nodes = list(model.graph.node)
    floats = _float_tensors(model)
    constants = {init.name for init in model.graph.initializer}
    constants |= {out for node in nodes if node.op_type == "Constant" for out in node.output}
    convs = [n for n in nodes if n.op_type == "Conv"]
    network = _ancestors(nodes, convs)
    producer = {out: node for node in nodes for out in node.output}
    # Nodes strictly upstream of some convolution; a conv outside it is a prediction conv.
    upstream = _ancestors(nodes, [producer[i] for c in convs for i in c.input if i in producer])
    plan = GraphPlan(region=network, op_types=list(NETWORK_OPS))
    for node in nodes:
        if node.name not in network or node.op_type not in NETWORK_OPS:
            continue
        if node.op_type == "Add" and any(i in constants or i not in floats for i in node.input):
            continue
        if node.input[0] not in floats:
            continue
        if node.op_type == "Conv" and options.keep_prediction_convs and \
                node.name not in upstream:
            plan.kept_convs.append(node.name)
            continue
        plan.quantize.append(node.name)
    if options.quantize_mask_head:
        plan.region = {n.name for n in nodes}
        plan.quantize += [n.name for n in nodes if n.op_type == "MatMul" and n.name not in network]
        plan.op_types.append("MatMul")
    return plan


def split_model(model: Any, region: set[str]) -> Any:
    """The sub-model of the ``region`` nodes (closed under dependencies): the graph inputs and
    initializers they use, and as outputs every tensor they make that the rest of the graph
    (or the graph's output) reads. Tensor and node names are unchanged."""
    import onnx

    inside = [n for n in model.graph.node if n.name in region]
    if len(inside) == len(model.graph.node):
        return model
    rest = [n for n in model.graph.node if n.name not in region]
    read_outside = {i for n in rest for i in n.input} | {o.name for o in model.graph.output}
    used = {i for n in inside for i in n.input}
    typed = onnx.shape_inference.infer_shapes(model).graph
    infos = {vi.name: vi for vi in [*typed.value_info, *typed.output]}
    outputs = [infos[o] for n in inside for o in n.output if o in read_outside]
    graph = onnx.helper.make_graph(
        inside, "network", [i for i in model.graph.input if i.name in used], outputs,
        initializer=[i for i in model.graph.initializer if i.name in used])
    sub = onnx.helper.make_model(graph, opset_imports=model.opset_import)
    sub.ir_version = model.ir_version
    return sub


def splice_model(model: Any, region: set[str], quantized: Any) -> Any:
    """``model`` with its ``region`` nodes replaced by the quantised sub-model's nodes (the
    sub-model keeps the names of the tensors the rest of the graph reads). The rest keeps
    its own initializers: a quantised-side initializer of the same name is renamed."""
    import onnx

    if len(region) == len(model.graph.node):
        return quantized
    rest = [n for n in model.graph.node if n.name not in region]
    read = {i for n in rest for i in n.input}
    nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in quantized.graph.node]
    inits = [onnx.TensorProto.FromString(i.SerializeToString())
             for i in quantized.graph.initializer]
    clash = {i.name for i in inits} & read
    for init in inits:
        if init.name in clash:
            init.name += "__int8"
    for node in nodes:
        for k, name in enumerate(node.input):
            if name in clash:
                node.input[k] = name + "__int8"
    have = {i.name for i in inits} | {o for n in nodes for o in n.output}
    extra = [i for i in model.graph.initializer if i.name in read and i.name not in have]
    graph = onnx.helper.make_graph([*nodes, *rest], model.graph.name, list(model.graph.input),
                                   list(model.graph.output), initializer=[*inits, *extra])
    merged = onnx.helper.make_model(graph, opset_imports=quantized.opset_import)
    merged.ir_version = max(model.ir_version, quantized.ir_version)
    merged.metadata_props.extend(model.metadata_props)
    return merged


def _reader(feeds: Iterator[dict[str, Any]]) -> Any:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over ``feeds`` (one pass)."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Feeds(CalibrationDataReader):
        def get_next(self) -> dict[str, Any] | None:
            return next(feeds, None)

    return _Feeds()


def _stamp(model: Any, values: dict[str, str]) -> None:
    """Set ``metadata_props`` keys (replacing existing entries of the same key)."""
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in values]
    del model.metadata_props[:]
    for key, value in [*kept, *values.items()]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def _quantize_static(model: Any, feeds: Iterator[dict[str, Any]], plan: GraphPlan,
                     options: QuantizeOptions) -> Any:
    """Run ``quantize_static`` on ``model`` (a ModelProto) and return the QDQ ModelProto."""
    import logging

    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[options.method]
    names = {i.name for i in model.graph.input}
    reader = _reader({k: v for k, v in feed.items() if k in names} for feed in feeds)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser's advice warnings go to the root logger
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "quantized.onnx"
            quantize_static(
                model, out, reader, quant_format=QuantFormat.QDQ,
                op_types_to_quantize=plan.op_types, nodes_to_quantize=plan.quantize,
                per_channel=options.per_channel, reduce_range=False,
                activation_type=QuantType.QInt8 if options.symmetric else QuantType.QUInt8,
                weight_type=QuantType.QInt8, calibrate_method=method,
                extra_options={"ActivationSymmetric": options.symmetric,
                               "WeightSymmetric": True},
            )
            return onnx.load(str(out))
    finally:
        root.setLevel(level)


def quantize_model(model: Any, feeds: Iterator[dict[str, Any]], options: QuantizeOptions,
                   reuse: dict[str, Any] | None = None) -> tuple[Any, GraphPlan]:
    """Quantise an exported graph (``onnx.ModelProto``) calibrated on ``feeds``.

    Only the planned region (:func:`plan_graph`) goes through the quantiser, as a sub-model
    (:func:`split_model`), and is spliced back; the rest of the graph is unchanged. ``reuse``
    maps a region's SHA-256 to its quantised sub-model, so the automatic and prompt graphs of
    one export (the same network) are calibrated and quantised once.

    Returns:
        (the QDQ model, the plan that was applied).
    """
    if options.method not in METHODS:
        raise InputError(f"calibration method {options.method!r}: choose one of "
                         f"{', '.join(METHODS)}")
    model = prepare_model(model)
    plan = plan_graph(model, options)
    sub = split_model(model, plan.region)
    key = region_signature(sub)
    reuse = {} if reuse is None else reuse
    if key not in reuse:
        reuse[key] = _quantize_static(sub, feeds, plan, options)
    return splice_model(model, plan.region, reuse[key]), plan


def _write(model: Any, path: Path, metadata: dict[str, str]) -> None:
    """Stamp the graph metadata, write atomically, run the ONNX checker."""
    import onnx

    _stamp(model, metadata)
    model.producer_name = "sim-boxseg export (int8)"
    atomic_write(path, lambda tmp: onnx.save(model, tmp))
    onnx.checker.check_model(str(path))


def _int8_sidecar(sidecar: ExportSidecar, export_id: str, graphs: dict[str, Path],
                  record: dict[str, Any]) -> dict[str, Any]:
    data = json.loads(sidecar.path.read_text(encoding="utf-8"))
    data["export_id"] = export_id
    data["precision"] = "int8"
    data["quantization"] = record
    data["engines"] = {}
    for kind, path in graphs.items():
        data["graphs"][kind]["file"] = path.name
    return data


def quantize_export(export: str | os.PathLike, calibration: CalibrationSet | str | os.PathLike,
                    *, count: int = DEFAULT_CALIBRATION_COUNT,
                    images_root: str | os.PathLike | None = None,
                    options: QuantizeOptions | None = None,
                    name: str | None = None) -> ExportResult:
    """Write ``<name>.int8.auto.onnx``, ``<name>.int8.prompt.onnx`` and ``<name>.int8.json``
    next to the fp32 export ``export`` (its sidecar, a graph of it, or its folder).

    Args:
        calibration: a :class:`CalibrationSet`, or a folder / COCO JSON of images (then
            ``count`` of them, found under ``images_root`` for a JSON).
        options: :class:`QuantizeOptions` (defaults: minmax, per-channel, uint8 activations,
            prediction convolutions and the dynamic mask head in fp32).
        name: file stem of the INT8 files (default ``<fp32 stem>.int8``).

    Returns:
        :class:`export.onnx.ExportResult` of the INT8 files. Its sidecar records
        ``"precision": "int8"`` and, under ``"quantization"``, the calibration set (source,
        count, SHA-256 of the images), the options and the nodes kept in fp32.
    """
    import onnxruntime

    options = options or QuantizeOptions()
    sidecar = read_sidecar(export)
    if sidecar.precision != "fp32":
        raise InputError(f"{sidecar.path}: already {sidecar.precision}; quantise the fp32 "
                         "export (the .json python -m export wrote without --int8)")
    cal = calibration if isinstance(calibration, CalibrationSet) else \
        load_calibration_set(calibration, count, images_root)
    stem = name or sidecar.path.name[: -len(".json")] + ".int8"
    export_id = uuid.uuid4().hex
    result = ExportResult(sidecar=sidecar.path.with_name(stem + ".json"))
    kept: dict[str, Any] = {}
    reuse: dict[str, Any] = {}
    for kind, suffix in (("automatic", "auto"), ("prompt", "prompt")):
        dst = sidecar.path.with_name(f"{stem}.{suffix}.onnx")
        quantized, plan = quantize_model(optimize_model(sidecar.file(kind)),
                                         calibration_feeds(cal, sidecar, kind), options, reuse)
        _write(quantized, dst, {"format": "sim-condinst-export", "graph": kind,
                                "export_id": export_id, "precision": "int8"})
        result.graphs[kind] = dst
        kept[kind] = {"quantized_nodes": len(plan.quantize), "fp32_convs": plan.kept_convs}
    record = {"tool": "onnxruntime.quantization.quantize_static",
              "onnxruntime_version": onnxruntime.__version__, "format": "QDQ",
              "activations": "int8 symmetric" if options.symmetric else "uint8 asymmetric",
              "weights": "int8 symmetric " + ("per-channel" if options.per_channel
                                              else "per-tensor"),
              "options": options.to_dict(), "calibration": cal.to_dict(), "graphs": kept,
              "source": {"sidecar": sidecar.path.name, "export_id": sidecar.export_id}}
    text = json.dumps(_int8_sidecar(sidecar, export_id, result.graphs, record), indent=2)
    atomic_write(result.sidecar, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return result
