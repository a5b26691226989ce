"""What an export writes: two checked ONNX graphs with dynamic shapes, the sidecar, and a
graph that TensorRT's ONNX parser can read (the session export of ``python -m export``)."""

from __future__ import annotations

import json

import onnx
import pytest
from onnx import TensorProto, helper

from export import check_tensorrt_ops, export_onnx
from export.tensorrt import graph_op_types, tensorrt_op_table
from serving.errors import CheckpointError, InputError
from serving.model.model_file import read_checkpoint_card


def _dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_graphs_pass_the_checker_with_named_dynamic_io(tiny_export):
    auto = onnx.load(str(tiny_export.graphs["automatic"]))
    prompt = onnx.load(str(tiny_export.graphs["prompt"]))
    for model in (auto, prompt):
        onnx.checker.check_model(model, full_check=True)
        assert model.opset_import[0].version == 18
        images = _dims(model.graph.input[0])
        assert images[1] == 3 and all(isinstance(d, str) for d in images[0:1] + images[2:])
    assert [i.name for i in auto.graph.input] == ["images", "image_sizes"]
    assert [o.name for o in auto.graph.output] == ["boxes", "scores", "labels", "masks",
                                                   "num_detections"]
    assert [i.name for i in prompt.graph.input] == ["images", "image_sizes", "boxes",
                                                    "box_labels"]
    assert [o.name for o in prompt.graph.output] == ["masks", "scores", "labels"]
    assert isinstance(_dims(prompt.graph.input[2])[1], str)  # number of prompt boxes
    assert "NonMaxSuppression" in graph_op_types(tiny_export.graphs["automatic"])
    meta = {p.key: p.value for p in auto.metadata_props}
    assert meta["graph"] == "automatic" and meta["format"] == "sim-condinst-export"


def test_sidecar_content(export_checkpoint, tiny_export):
    data = json.loads(tiny_export.sidecar.read_text())
    info = read_checkpoint_card(export_checkpoint)
    assert data["format"] == "sim-condinst-export" and data["format_version"] == 2
    assert data["class_names"] == list(info.class_names) == ["disc", "ring", "triangle"]
    assert data["model_config"]["backbone"] == "mobilenet_v2"
    assert data["model_config"]["num_classes"] == info.model.num_classes == 3
    assert data["inference_config"]["max_detections"] == 20
    assert data["inference_config"]["score_threshold"] == info.inference.score_threshold
    rules = data["input_rules"]
    assert (rules["min_size"], rules["max_size"], rules["size_divisibility"]) == (128, 256, 32)
    assert rules["static_shape"] is None and rules["mask_stride"] == 4
    assert data["graphs"]["automatic"] == {
        "file": tiny_export.graphs["automatic"].name, "inputs": ["images", "image_sizes"],
        "outputs": ["boxes", "scores", "labels", "masks", "num_detections"]}
    assert data["graphs"]["prompt"]["inputs"][-1] == "box_labels"
    export_step = data["history"][-1]
    assert export_step["made_by"] == "export onnx" and export_step["details"]["opset"] == 18
    assert export_step["source"] == export_checkpoint.name and data["precision"] == "fp32"
    assert data["history"][:-1] == [p.to_dict() for p in info.history]
    meta = {p.key: p.value for p in
            onnx.load(str(tiny_export.graphs["prompt"])).metadata_props}
    assert meta["export_id"] == data["export_id"] and len(data["export_id"]) == 32


def test_every_op_is_supported_by_tensorrt(tiny_export):
    table = tensorrt_op_table()
    assert table["tensorrt_version"].startswith("10.") and "operators.md" in table["source"]
    for path in tiny_export.graphs.values():
        assert check_tensorrt_ops(path) == []


def test_tensorrt_op_check_reports_unsupported_ops(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [5000])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("u", "v", "t")]
    k = helper.make_tensor("k", TensorProto.INT64, [1], [4000])
    nodes = [helper.make_node("Unique", ["x"], ["u"]),
             helper.make_node("MyOp", ["x"], ["v"], domain="custom.domain"),
             helper.make_node("TopK", ["x", "k"], ["t", "ti"])]
    graph = helper.make_graph(nodes, "g", [x], outs, initializer=[k])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert check_tensorrt_ops(path) == ["TopK(K=4000)", "Unique", "custom.domain::MyOp"]


@pytest.mark.parametrize("kwargs, error, match", [
    ({"opset": 16}, InputError, "at least 17"),
    ({"max_detections": 0}, InputError, "at least 1"),
])
def test_export_argument_errors(tiny_checkpoint, tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        export_onnx(tiny_checkpoint, tmp_path, **kwargs)


def test_export_input_errors(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="file not found"):
        export_onnx(tmp_path / "missing.safetensors", tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="not writable"):
        export_onnx(tiny_checkpoint, blocker / "out")
