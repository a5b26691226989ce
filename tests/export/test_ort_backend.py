"""ONNX Runtime backend: loading, sidecar checks, provider choice, overrides, clear errors."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

from serving import Segmenter
from serving.backends.exported import read_sidecar, sidecar_path
from serving.backends.locate import locate_model
from serving.backends.onnxruntime_backend import choose_providers, import_onnxruntime
from serving.errors import CheckpointError, InputError

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def _copy_export(result, dest):
    """Copy an export's files into ``dest``; returns the new sidecar path."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in result.paths:
        shutil.copy(path, dest / path.name)
    return dest / result.sidecar.name


def test_load_by_any_export_path(tiny_export, tmp_path):
    for path in (tiny_export.sidecar, tiny_export.graphs["automatic"],
                 tiny_export.graphs["prompt"]):
        assert sidecar_path(path) == tiny_export.sidecar
    alone = _copy_export(tiny_export, tmp_path / "alone")
    assert locate_model(alone.parent) == (alone, "onnx")
    # the fp32 and the INT8 export side by side: the folder names the fp32 one
    assert locate_model(tiny_export.sidecar.parent) == (tiny_export.sidecar, "onnx")
    seg = Segmenter.load(tiny_export.graphs["automatic"], device="cpu")
    info = seg.model_info
    assert info["backend"] == "onnxruntime" and info["device"] == "cpu"
    assert info["classes"] == ["disc", "ring", "triangle"] and info["min_size"] == 128
    assert seg.backend.providers == [CPU]


def test_corrupt_onnx_file_is_a_clear_error(tiny_export, tmp_path):
    sidecar = _copy_export(tiny_export, tmp_path)
    graph = tmp_path / tiny_export.graphs["prompt"].name
    graph.write_bytes(graph.read_bytes()[:5000])  # truncated
    with pytest.raises(CheckpointError, match="cannot be loaded.*re-export") as err:
        Segmenter.from_onnx(sidecar, device="cpu")
    assert str(graph) in str(err.value) and "\n" not in str(err.value)


def test_missing_graph_and_missing_sidecar(tiny_export, tmp_path):
    sidecar = _copy_export(tiny_export, tmp_path / "a")
    (tmp_path / "a" / tiny_export.graphs["automatic"].name).unlink()
    with pytest.raises(CheckpointError, match="not found"):
        Segmenter.from_onnx(sidecar, device="cpu")
    lone = tmp_path / "b"
    lone.mkdir()
    shutil.copy(tiny_export.graphs["automatic"], lone)
    with pytest.raises(CheckpointError, match="sidecar .* is missing"):
        Segmenter.from_onnx(lone / tiny_export.graphs["automatic"].name, device="cpu")


def test_mismatched_sidecar_is_detected(tiny_export, tmp_path):
    sidecar = _copy_export(tiny_export, tmp_path)
    data = json.loads(sidecar.read_text())
    data["export_id"] = "0" * 32  # a sidecar written by another export
    sidecar.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="does not belong to sidecar"):
        Segmenter.from_onnx(sidecar, device="cpu")
    data = json.loads(tiny_export.sidecar.read_text())
    data["class_names"] = ["a", "b"]  # 2 names for a 3-class model
    sidecar.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="2 class names for num_classes=3"):
        read_sidecar(sidecar)
    data = json.loads(tiny_export.sidecar.read_text())
    data["graphs"]["automatic"]["file"] = tiny_export.graphs["prompt"].name  # swapped graphs
    sidecar.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="does not belong"):
        Segmenter.from_onnx(sidecar, device="cpu")


@pytest.mark.parametrize("content, match", [
    ("{not json", "unreadable export sidecar"),
    ('{"format": "something-else"}', "not an export sidecar"),
    ('{"format": "sim-condinst-export", "format_version": 99}', "version 99"),
    ('{"format": "sim-condinst-export", "format_version": 1}', "corrupt export sidecar"),
])
def test_bad_sidecar_files(tmp_path, content, match):
    path = tmp_path / "model.json"
    path.write_text(content)
    with pytest.raises(CheckpointError, match=match):
        read_sidecar(tmp_path / "model.auto.onnx")


def test_onnxruntime_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(CheckpointError, match="pip install onnxruntime"):
        import_onnxruntime()


def test_choose_providers():
    assert choose_providers([CPU], "auto") == [CPU]
    assert choose_providers([CUDA, CPU], "auto") == [CUDA, CPU]
    assert choose_providers([CUDA, CPU], "cpu") == [CPU]
    assert choose_providers([CUDA, CPU], "cuda:1") == [(CUDA, {"device_id": 1}), CPU]
    assert choose_providers([CUDA, CPU], "auto", providers=[CPU]) == [CPU]
    with pytest.raises(InputError, match="pip install onnxruntime-gpu"):
        choose_providers([CPU], "cuda")
    with pytest.raises(InputError, match="not available"):
        choose_providers([CPU], "auto", providers=["TensorrtExecutionProvider"])
    with pytest.raises(InputError, match="use auto, cpu"):
        choose_providers([CPU], "gpu")


def test_threshold_overrides_are_exact(export_checkpoint, tiny_export, sample_image):
    ref = Segmenter.from_checkpoint(export_checkpoint, device="cpu").predict(sample_image)
    # a threshold between the 4th and 5th p = score**2 keeps exactly 4 detections
    t = float(ref.scores[3] ** 2 + ref.scores[4] ** 2) / 2
    torch_pred = Segmenter.from_checkpoint(export_checkpoint, device="cpu",
                                           score_threshold=t).predict(sample_image)
    onnx_pred = Segmenter.from_onnx(tiny_export.sidecar, device="cpu",
                                    score_threshold=t).predict(sample_image)
    assert len(torch_pred) == len(onnx_pred) == 4
    np.testing.assert_allclose(onnx_pred.scores, torch_pred.scores, atol=1e-4)
    fewer = Segmenter.from_onnx(tiny_export.sidecar, device="cpu", max_detections=3)
    assert len(fewer.predict(sample_image)) == 3
    with pytest.raises(InputError, match="only higher thresholds"):
        Segmenter.from_onnx(tiny_export.sidecar, device="cpu", score_threshold=0.01)
    with pytest.raises(InputError, match="re-export with --max-detections"):
        Segmenter.from_onnx(tiny_export.sidecar, device="cpu", max_detections=50)
    with pytest.raises(InputError, match="nms_threshold=0.5 differs"):
        Segmenter.from_onnx(tiny_export.sidecar, device="cpu", nms_threshold=0.5)


@pytest.mark.parametrize("box_scale", [False, True])
def test_onnx_runs_more_boxes_than_one_pass_with_the_results_of_one_pass(tiny_export,
                                                                         box_scale):
    """More prompt boxes than ``max_prompt_boxes`` run in passes: each ONNX call holds at
    most two boxes, and the results equal one pass of all five."""
    from export_images import random_image
    from sim_testing import record_box_widths

    image = random_image(120, 160, 3)
    boxes = [[10, 10, 60, 50], [30, 20, 80, 60], [90, 50, 150, 110], [5, 5, 40, 40],
             [100, 10, 150, 60]]
    one = Segmenter.load(tiny_export.graphs["prompt"], device="cpu", box_scale=box_scale)
    split = Segmenter.load(tiny_export.graphs["prompt"], device="cpu", box_scale=box_scale,
                           max_prompt_boxes=2)
    widths = record_box_widths(split)
    got, want = split.predict(image, boxes=boxes), one.predict(image, boxes=boxes)
    assert widths and max(widths) <= 2
    np.testing.assert_array_equal(got.scores, want.scores)
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_array_equal(got.masks, want.masks)
