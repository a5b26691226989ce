"""Graph surgery on exported ONNX models, used by INT8 quantisation (:mod:`export.quantize`).

ONNX Runtime's basic optimisation pass, naming and identity clean-up, dependency closures, and
cutting a region of a graph out as its own model and putting a (quantised) version back.
Every function takes and returns ``onnx.ModelProto`` objects; tensor and node names are kept.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any


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


def ancestors(nodes: list[Any], seeds: list[Any]) -> set[str]:
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
