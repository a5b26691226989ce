"""INT8 ONNX graphs from an fp32 export: ONNX Runtime static quantisation (QDQ, per-channel).

>>> result = quantize_export("exported/model.json", "data/train_images/")
>>> result.sidecar          # exported/model.int8.json, next to model.int8.{auto,prompt}.onnx
>>> Segmenter.load("exported/model.int8.auto.onnx").predict("image.jpg")

Works on the ONNX files ``python -m export`` wrote, whichever exporter made them. Each graph
is calibrated on the user's images (:mod:`export.int8_calibration`, the serving preprocessing) and
quantised with ``onnxruntime.quantization.quantize_static``: QDQ format, uint8 activations
(asymmetric, the fast choice for x86 kernels) and int8 per-channel weights on 7 bits
(``reduce_range``): ONNX Runtime's int8 kernels on x86 CPUs without VNNI (AVX2 only) add
pairs of 8-bit products into int16, which full-range weights can saturate; 7-bit weights
cannot, so one file gives the same results on every x86 CPU.

What is quantised is chosen on the graph's structure, not on node names: the **network** is
every node a convolution depends on, plus the convolutions. Inside it, convolutions, their
Relu/Clip, max-pooling, resizing and the Adds of two activations (residuals, FPN sums) run in
int8; GroupNorm and (by default) depthwise convolutions stay fp32. Everything after the last
convolutions stays fp32: box decoding, scores, top-k, NMS, the IoU weighting of prompts, the
controller (a product at the kept locations only) and the dynamic mask head (unless
``quantize_mask_head``) and, by default, the prediction convolutions whose outputs feed those
(``keep_prediction_convs``; box regression, centerness, class logits, mask features).
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.backends.exported import ExportSidecar, read_sidecar, write_sidecar
from serving.errors import InputError
from serving.files import atomic_write
from serving.model.card import Provenance

from .int8_calibration import (
    DEFAULT_CALIBRATION_COUNT,
    CalibrationSet,
    calibration_feeds,
    load_calibration_set,
)
from .onnx import ExportResult
from .onnx_graph import (
    ancestors,
    optimize_model,
    prepare_model,
    region_signature,
    splice_model,
    split_model,
)

METHODS = ("minmax", "percentile", "entropy")
#: Operator types quantised inside the network (Add only when both inputs are activations).
NETWORK_OPS = ("Conv", "Relu", "Clip", "MaxPool", "Resize", "Add")


@dataclass
class QuantizeOptions:
    """How to quantise. Defaults are what ``python -m export --int8`` uses.

    ``method``: calibration (minmax, percentile = 99.999th, entropy); ``keep_prediction_convs``:
    the convolutions that produce class logits, box regression, centerness and mask features
    stay fp32; ``quantize_depthwise``: also run depthwise
    convolutions in int8 (off: ONNX Runtime's int8 depthwise kernel is slower than its fp32
    one on x86, measured in docs/export.md); ``quantize_mask_head``: also run the MatMuls after
    the network in int8 (the dynamic mask head's and the controller's); ``symmetric``: int8 activations with zero point 0 (what TensorRT's
    explicit quantisation needs) instead of uint8 asymmetric (faster on x86 CPUs);
    ``reduce_range``: weights on 7 bits (-64..64), so that x86 CPUs without VNNI, whose ONNX
    Runtime kernels add pairs of uint8 x int8 products into int16, cannot saturate (at most
    2 * 255 * 64 = 32640) and give the results of those with VNNI (on an AVX2 CPU, 8-bit
    weights failed the INT8 export check with either activation form, docs/export.md).
    """

    method: str = "minmax"
    keep_prediction_convs: bool = True
    quantize_depthwise: bool = False
    quantize_mask_head: bool = False
    symmetric: bool = False
    per_channel: bool = True
    reduce_range: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class GraphPlan:
    """What to quantise in one graph (node names).

    ``region``: the nodes handed to the quantiser, closed under dependencies (the network, or
    the whole graph with ``quantize_mask_head``); ``quantize``: the nodes inside it that run in
    int8; ``kept_convs``: prediction convolutions kept in fp32; ``kept_depthwise``: depthwise
    convolutions kept in fp32.
    """

    region: set[str] = field(default_factory=set)
    quantize: list[str] = field(default_factory=list)
    kept_convs: list[str] = field(default_factory=list)
    kept_depthwise: list[str] = field(default_factory=list)
    op_types: list[str] = field(default_factory=list)


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
    network = ancestors(nodes, convs)
    producer = {out: node for node in nodes for out in node.output}
    # Nodes strictly upstream of some convolution; a conv outside it is a prediction conv.
    upstream = ancestors(nodes, [producer[i] for c in convs for i in c.input if i in producer])
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
        if node.op_type == "Conv" and not options.quantize_depthwise and \
                any(a.name == "group" and a.i > 1 for a in node.attribute):
            plan.kept_depthwise.append(node.name)
            continue
        plan.quantize.append(node.name)
    if options.quantize_mask_head:
        plan.region = {n.name for n in nodes}
        plan.quantize += [n.name for n in nodes if n.op_type == "MatMul" and n.name not in network]
        plan.op_types.append("MatMul")
    return plan


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
                per_channel=options.per_channel,
                reduce_range=options.reduce_range,
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


def _write_int8_sidecar(path: Path, sidecar: ExportSidecar, export_id: str,
                        graphs: dict[str, Path], record: dict[str, Any]) -> None:
    """The INT8 export's sidecar: the fp32 one's card after an "export int8" step, its own
    graphs, no engines, and the quantization ``record``."""
    meta = {kind: {**spec, "file": graphs[kind].name} for kind, spec in sidecar.graphs.items()}
    step = Provenance.now("export int8", sidecar.path.name, tool=record["tool"],
                          onnxruntime_version=record["onnxruntime_version"])
    write_sidecar(path, export_id=export_id, card=sidecar.card.step(step, precision="int8"),
                  graphs=meta, quantization=record)


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
        kept[kind] = {"quantized_nodes": len(plan.quantize), "fp32_convs": plan.kept_convs,
                      "fp32_depthwise_convs": len(plan.kept_depthwise)}
    record = {"tool": "onnxruntime.quantization.quantize_static",
              "onnxruntime_version": onnxruntime.__version__, "format": "QDQ",
              "activations": "int8 symmetric" if options.symmetric else "uint8 asymmetric",
              "weights": "int8 symmetric " + ("per-channel" if options.per_channel
                                              else "per-tensor")
              + (", 7-bit range (-64..64)" if options.reduce_range else ""),
              "options": options.to_dict(), "calibration": cal.to_dict(), "graphs": kept,
              "source": {"sidecar": sidecar.path.name, "export_id": sidecar.export_id}}
    _write_int8_sidecar(result.sidecar, sidecar, export_id, result.graphs, record)
    return result
