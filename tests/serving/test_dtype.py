"""bf16 / fp16 for the PyTorch backend: names, the CPU capability check and its one-line
refusal, bf16 results close to fp32 on the tiny model, fp32 where numerics are fragile, and
``--dtype`` reaching ``Segmenter.load`` from predict, label, serve and the app."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from serving import Segmenter
from serving.backends import torch_backend
from serving.backends.torch_backend import check_dtype, cpu_bf16_support, parse_dtype
from serving.errors import InputError, SimError

CPU = torch.device("cpu")


@pytest.fixture()
def bf16_cpu(monkeypatch):
    """Pretend the CPU has native bf16 (autocast works everywhere, only slower without)."""
    monkeypatch.setattr(torch_backend, "cpu_bf16_support", lambda: "AVX512_BF16")


@pytest.fixture()
def no_bf16_cpu(monkeypatch):
    monkeypatch.setattr(torch_backend, "cpu_bf16_support", lambda: None)


def test_dtype_names():
    assert parse_dtype(None) is None and parse_dtype("fp32") is None
    assert parse_dtype(torch.float32) is None
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("BF16") is torch.bfloat16
    assert parse_dtype(torch.float16) is torch.float16
    for bad in ("int8", "float64", torch.float64):
        with pytest.raises(InputError, match="choose one of fp32, bf16, fp16"):
            parse_dtype(bad)


def test_capability_comes_from_the_cpu():
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    support = cpu_bf16_support()
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        assert support in ("AVX512_BF16", "AMX_BF16")
    assert support is None or isinstance(support, str)


def test_refusals_are_one_line_with_the_reason(no_bf16_cpu, tiny_checkpoint):
    with pytest.raises(InputError, match="no native bf16 instructions") as info:
        check_dtype(torch.bfloat16, CPU)
    assert "\n" not in str(info.value) and "--dtype fp32" in str(info.value)
    with pytest.raises(InputError, match="fp16: needs a CUDA GPU"):
        check_dtype(torch.float16, CPU)
    with pytest.raises(InputError, match="no native bf16"):
        Segmenter.load(tiny_checkpoint, device="cpu", dtype="bf16")
    check_dtype(None, CPU)  # fp32 is always fine


def test_bf16_close_to_fp32_on_the_tiny_model(bf16_cpu, tiny_checkpoint, sample_image):
    """Network outputs within bf16 rounding (relative 2^-6 of each output's range); locations
    exactly fp32; prompt masks IoU >= 0.9 and identical automatic detections' count."""
    fp32 = Segmenter.load(tiny_checkpoint, device="cpu")
    bf16 = Segmenter.load(tiny_checkpoint, device="cpu", dtype="bf16")
    assert bf16.info["precision"] == "bf16" and fp32.info["precision"] == "fp32"
    batch, _, sizes = fp32._preprocess([sample_image])
    sizes = torch.tensor(sizes, dtype=torch.int64)
    with torch.inference_mode():
        a = fp32.backend._forward(batch, sizes)
        b = bf16.backend._forward(batch, sizes)
    assert all(t.dtype != torch.bfloat16 for t in b)  # cast back before post-processing
    torch.testing.assert_close(b.locations, a.locations, rtol=0, atol=0)
    assert not torch.equal(a.cls_logits, b.cls_logits)  # bf16 really ran
    for name in ("cls_logits", "box_reg", "ctrness", "box_feats", "mask_feats"):
        x, y = getattr(a, name), getattr(b, name)
        scale = float(x.abs().max()) or 1.0
        assert float((x - y).abs().max()) <= 2**-6 * scale + 1e-3, name
    boxes = np.array([[20, 15, 90, 70], [80, 40, 155, 115]], np.float32)
    pa, pb = fp32.predict(sample_image, boxes=boxes), bf16.predict(sample_image, boxes=boxes)
    for ma, mb in zip(pa.masks, pb.masks):
        union = np.logical_or(ma, mb).sum()
        assert union == 0 or np.logical_and(ma, mb).sum() / union >= 0.9
    np.testing.assert_allclose(pb.scores, pa.scores, atol=0.02)


def test_bf16_autocast_leaves_post_processing_in_fp32(bf16_cpu, tiny_checkpoint, sample_image,
                                                      monkeypatch):
    """Box decoding, NMS and the mask head run outside autocast, on fp32 tensors."""
    from serving.inference import postprocess

    seen = []
    original = postprocess.decode_boxes

    def spy(locations, box_reg, strides):
        seen.append((torch.is_autocast_enabled("cpu"), locations.dtype, box_reg.dtype))
        return original(locations, box_reg, strides)

    monkeypatch.setattr(postprocess, "decode_boxes", spy)
    Segmenter.load(tiny_checkpoint, device="cpu", dtype="bf16").predict(sample_image)
    assert seen and all(s == (False, torch.float32, torch.float32) for s in seen)


class _Stop(SimError):
    pass


@pytest.fixture()
def load_calls(monkeypatch):
    """Record ``Segmenter.load`` keyword arguments, then stop the command (one-line error)."""
    calls = []

    def fake_load(path, device="auto", dtype=None, **overrides):
        calls.append({"device": device, "dtype": dtype})
        raise _Stop("stopped by the test")

    monkeypatch.setattr(Segmenter, "load", staticmethod(fake_load))
    return calls


def test_dtype_reaches_the_backend_from_every_command(load_calls, tiny_checkpoint, tmp_path):
    from app.launch import main as app_main
    from serving.__main__ import main as serving_main

    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(images / "a.png")
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}],
                                 "annotations": [], "categories": []}))
    model = str(tiny_checkpoint)
    commands = [
        lambda: serving_main(["predict", "--model", model, "--input", str(images), "--output",
                              str(tmp_path / "p"), "--dtype", "bf16", "--no-progress"]),
        lambda: serving_main(["label", "--model", model, "--annotations", str(boxes),
                              "--images", str(images), "--output", str(tmp_path / "l.json"),
                              "--dtype", "bf16", "--no-progress"]),
        lambda: serving_main(["serve", "--model", model, "--dtype", "bf16"]),
        lambda: app_main(["--model", model, "--dtype", "bf16"]),
    ]
    for run in commands:
        assert run() == 1
    assert [c["dtype"] for c in load_calls] == ["bf16"] * 4


def test_server_workers_load_with_the_dtype(bf16_cpu, tiny_checkpoint, monkeypatch):
    from serving.server.app import SETTINGS_ENV, ServerSettings, app_from_env

    monkeypatch.setenv(SETTINGS_ENV, json.dumps({
        "model": str(tiny_checkpoint), "device": "cpu", "dtype": "bf16",
        "settings": {"max_batch": 2}}))
    created = {}
    monkeypatch.setattr("serving.server.app.create_app",
                        lambda seg, settings: created.update(seg=seg, settings=settings))
    app_from_env()
    assert created["seg"].backend.dtype is torch.bfloat16
    assert isinstance(created["settings"], ServerSettings)
