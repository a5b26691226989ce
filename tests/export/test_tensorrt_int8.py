"""TensorRT INT8: which precision an engine gets and what is refused (tested everywhere), and
the two INT8 builds, explicit from a symmetric QDQ export and implicit with the entropy
calibrator (need ``tensorrt`` and a CUDA GPU; skipped here like the other engine tests)."""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import sys

import pytest
import torch

from export.tensorrt import build_tensorrt_engine, engine_precision
from serving.backends.exported import read_sidecar
from serving.errors import InputError

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
needs_trt = pytest.mark.skipif(
    not (HAS_TRT and torch.cuda.is_available()),
    reason="TensorRT engine tests need the tensorrt package and a CUDA GPU; not available here",
)


def _int8(sidecar, activations: str):
    return dataclasses.replace(sidecar, card=dataclasses.replace(sidecar.card, precision="int8"),
                               quantization={"activations": activations})


def test_engine_precision_labels_and_refusals(tiny_export):
    fp32 = read_sidecar(tiny_export.sidecar)
    assert engine_precision(fp32, False, None) == "fp32"
    assert engine_precision(fp32, True, None) == "fp16"
    assert engine_precision(fp32, False, object()) == "int8 (calibrated)"
    assert engine_precision(fp32, True, object()) == "int8 (calibrated, fp16)"
    assert engine_precision(_int8(fp32, "int8 symmetric"), True, None) == "int8 (explicit Q/DQ)"
    with pytest.raises(InputError, match="TensorRT needs symmetric int8") as info:
        engine_precision(_int8(fp32, "uint8 asymmetric"), False, None)
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="already INT8"):
        engine_precision(_int8(fp32, "int8 symmetric"), False, object())


def test_int8_build_without_tensorrt_says_how_to_install(tiny_export, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(InputError, match="pip install tensorrt"):
        build_tensorrt_engine(tiny_export.sidecar, int8_calibration=object())


@needs_trt
@pytest.mark.tensorrt
@pytest.mark.gpu
def test_explicit_and_calibrated_int8_engines(export_checkpoint, tiny_export, tmp_path,
                                             test_images):
    from PIL import Image

    from export.int8_calibration import load_calibration_set
    from export.quantize import QuantizeOptions, quantize_export
    from export.verify_int8 import verify_int8
    from serving import Segmenter

    for path in tiny_export.paths:
        shutil.copy(path, tmp_path / path.name)
    sidecar = tmp_path / tiny_export.sidecar.name
    cal_dir = tmp_path / "cal"
    cal_dir.mkdir()
    for i, image in enumerate(test_images["small"] + test_images["tall"]):
        Image.fromarray(image).save(cal_dir / f"{i}.png")
    cal = load_calibration_set(cal_dir)
    # Explicit: strongly typed network from the symmetric QDQ graphs.
    qdq = quantize_export(sidecar, cal, options=QuantizeOptions(symmetric=True))
    engines = build_tensorrt_engine(qdq.sidecar)
    assert read_sidecar(qdq.sidecar).engines["automatic"]["precision"] == "int8 (explicit Q/DQ)"
    seg = Segmenter.from_tensorrt(engines["automatic"])
    report = verify_int8(export_checkpoint, seg, test_images["small"], device="cuda")
    assert report.rows and report.mask_iou > 0.5
    # Implicit: IInt8EntropyCalibrator2 over the same images, cache written next to the engine.
    engines = build_tensorrt_engine(sidecar, int8_calibration=cal)
    assert engines["automatic"].with_suffix(".calib").is_file()
    pred = Segmenter.from_tensorrt(engines["automatic"]).predict(test_images["small"][0])
    assert len(pred.scores) == len(pred.boxes)
