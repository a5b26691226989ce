"""TensorRT engines and backend. Building and running need the ``tensorrt`` package and a CUDA
GPU; everything else (profiles, sidecar records, error messages) is tested everywhere."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch

from export.tensorrt import ShapeProfile, default_profile
from serving.backends.exported import read_sidecar
from serving.errors import CheckpointError, InputError

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
needs_trt = pytest.mark.skipif(
    not (HAS_TRT and torch.cuda.is_available()),
    reason="TensorRT engine tests need the tensorrt package and a CUDA GPU (pip install "
           "tensorrt on a machine with an NVIDIA driver); not available here",
)


def test_default_profile_covers_the_input_rules(tiny_export):
    profile = default_profile(read_sidecar(tiny_export.sidecar))
    assert profile.height == (32, 128, 256) and profile.width == (32, 256, 256)
    assert profile.batch == (1, 1, 8) and profile.boxes == (1, 10, 256)
    assert profile.shapes("images") == ((1, 3, 32, 32), (1, 3, 128, 256), (8, 3, 256, 256))
    assert profile.shapes("box_labels")[2] == (8, 256)
    for spec in read_sidecar(tiny_export.sidecar).graphs.values():
        for name in spec["inputs"]:
            assert len(ShapeProfile().shapes(name)) == 3  # every graph input has a profile


def test_engines_missing_from_sidecar(tiny_export):
    from serving import Segmenter

    with pytest.raises(CheckpointError, match="no TensorRT engines recorded"):
        Segmenter.from_tensorrt(tiny_export.sidecar)


def test_without_tensorrt_the_errors_say_how_to_install(monkeypatch):
    from export.tensorrt import import_tensorrt as export_import
    from serving.backends.tensorrt_backend import import_tensorrt as serving_import

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(InputError, match="pip install tensorrt"):
        export_import()
    with pytest.raises(CheckpointError, match="pip install tensorrt"):
        serving_import()


@needs_trt
@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_engine_parity(export_checkpoint, tiny_export, tmp_path, test_images):
    import shutil

    from export import build_tensorrt_engine, verify_export
    from serving import Segmenter

    for path in tiny_export.paths:
        shutil.copy(path, tmp_path / path.name)
    sidecar = tmp_path / tiny_export.sidecar.name
    cache = tmp_path / "timing.cache"
    engines = build_tensorrt_engine(sidecar, timing_cache=cache)
    assert cache.is_file() and all(p.is_file() for p in engines.values())
    seg = Segmenter.from_tensorrt(engines["automatic"])
    assert seg.model_info["backend"] == "tensorrt"
    report = verify_export(export_checkpoint, seg, test_images["small"] + test_images["tall"],
                           device="cuda")
    assert report.passed, report.table()
    engines16 = build_tensorrt_engine(sidecar, fp16=True, timing_cache=cache)
    pred = Segmenter.from_tensorrt(engines16["automatic"]).predict(test_images["small"][0])
    assert len(pred) > 0 and np.isfinite(pred.scores).all()


def test_engines_are_recorded_in_the_card(tmp_path, monkeypatch):
    """The sidecar writer of a TensorRT build, with the build itself stubbed (no GPU here):
    a release f16b7e0 export gains its engines and an "export tensorrt" step, keeps its card,
    and the engine paths resolve to it."""
    import types

    from sim_testing import release_files

    import export.tensorrt as trt_export
    from serving.backends.exported import file_sha256
    from serving.backends.locate import locate_model

    folder = release_files(tmp_path)
    before = read_sidecar(folder / "tiny.json")
    monkeypatch.setattr(trt_export, "import_tensorrt",
                        lambda: types.SimpleNamespace(__version__="10.0-stub"))
    monkeypatch.setattr(trt_export, "_build_one", lambda trt, onnx_path, engine, **kw:
                        engine.write_bytes(onnx_path.name.encode()))
    engines = trt_export.build_tensorrt_engine(folder / "tiny.auto.onnx", fp16=True)
    after = read_sidecar(folder / "tiny.json")
    assert [h.made_by for h in after.card.history] == ["train", "export onnx", "export tensorrt"]
    step = after.card.provenance
    assert step.source == "tiny.auto.onnx" and step.details == {
        "precision": "fp16", "tensorrt_version": "10.0-stub"}
    assert after.card.format_version == 2 and after.export_id == before.export_id
    assert (after.card.calibration, after.card.category_ids, after.graphs) == (
        before.card.calibration, before.card.category_ids, before.graphs)
    assert after.engines["automatic"]["sha256"] == file_sha256(engines["automatic"])
    assert locate_model(engines["prompt"]) == (engines["prompt"], "tensorrt")
    assert read_sidecar(engines["prompt"]).path == after.path
