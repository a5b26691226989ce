"""Model files written by release f16b7e0 (format version 1) load with today's code: the same
card fields (migrated from ``extra``) and the same predictions as that release made.

The files and the release's predictions are ``tests/fixtures/release_f16b7e0.tar.xz``, made by
``tests/fixtures/make_release_fixtures.py`` with that release's code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sim_testing import release_files

from serving import Segmenter
from serving.backends.exported import read_sidecar
from serving.backends.torch_backend import cpu_int8_vnni
from serving.model.card import Calibration
from serving.model.model_file import read_checkpoint_card

BOXES = [[10.0, 12.0, 70.0, 60.0], [80.0, 20.0, 150.0, 110.0], [5.0, 70.0, 60.0, 115.0]]
CALIBRATION = Calibration(score_threshold=0.3125, f1=41.5, validation="val.json",
                          prompt_scores={"p10": 0.2, "p50": 0.45, "p90": 0.7},
                          auto_scores={"p10": 0.3, "p50": 0.55, "p90": 0.8},
                          object_sizes={"p10": 24.0, "p50": 40.0, "p90": 72.0})
#: The release's INT8 predictions were made on a CPU with VNNI instructions. ONNX Runtime's
#: INT8 kernels without them (AVX2: the u8 x s8 pair products saturate at int16) give other
#: scores, so other detections; on such a CPU the INT8 files are loaded and run, not compared.
SAME_INT8_KERNELS = cpu_int8_vnni()


def skip_unless_same_kernels(name: str, seg: Segmenter, image: Path) -> None:
    """On a CPU without VNNI, an INT8 file's predictions are checked for form only, then the
    test is skipped with the reason."""
    if "int8" not in name or SAME_INT8_KERNELS:
        return
    pred = seg.predict(image)
    assert pred.boxes.shape == (len(pred), 4) and pred.masks.shape[0] == len(pred)
    pytest.skip("INT8 predictions depend on the CPU's INT8 instructions: the release's were "
                "made with VNNI, this CPU has none")


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return release_files(tmp_path_factory.mktemp("release"))


def summary(pred) -> dict:
    """The fixture script's summary of a prediction (pixel count and first pixel per mask)."""
    masks = pred.masks.reshape(len(pred), -1)
    return {"boxes": pred.boxes, "scores": pred.scores, "labels": pred.labels.tolist(),
            "mask_pixels": masks.sum(1).tolist(),
            "first_pixel": [int(np.argmax(m)) if m.any() else -1 for m in masks]}


def same(got: dict, want: dict, scores: bool = True) -> None:
    np.testing.assert_allclose(got["boxes"], np.asarray(want["boxes"]).reshape(-1, 4), atol=2e-3)
    if scores:
        np.testing.assert_allclose(got["scores"], want["scores"], atol=2e-5)
    for key in ("labels", "mask_pixels", "first_pixel"):
        assert got[key] == want[key], key


def test_release_checkpoint_card_is_migrated(release) -> None:
    card = read_checkpoint_card(release / "tiny.safetensors")
    assert card.format_version == 1 and card.precision == "fp32" and card.input_rules is None
    assert card.class_names == ("disc", "ring", "triangle") and card.category_ids == (1, 2, 7)
    assert card.calibration == CALIBRATION
    assert card.inference.min_size == 128 and card.model.fpn_channels == 32
    (step,) = card.history
    assert step.made_by == "train" and step.details["step"] == 1200
    assert "train_config" in step.details and step.created is None


@pytest.mark.parametrize("name, made_by, precision", [
    ("tiny.json", "export onnx", "fp32"), ("tiny.int8.json", "export int8", "int8")])
def test_release_sidecar_cards_are_migrated(release, name, made_by, precision) -> None:
    card = read_sidecar(release / name).card
    ckpt = read_checkpoint_card(release / "tiny.safetensors")
    assert card.format_version == 1 and card.precision == precision
    assert (card.class_names, card.model, card.category_ids, card.calibration) == (
        ckpt.class_names, ckpt.model, ckpt.category_ids, CALIBRATION)
    assert [h.made_by for h in card.history] == ["train", made_by]
    assert card.history[0] == ckpt.history[0]
    assert card.history[1].details["exporter"] == "dynamo" and card.history[1].details["opset"]
    assert card.input_rules["static_shape"] is None and card.input_rules["min_size"] == 128


@pytest.mark.parametrize("name", ["tiny.safetensors", "tiny.auto.onnx", "tiny.int8.auto.onnx"])
def test_release_files_predict_as_the_release_did(release, name) -> None:
    want = json.loads((release / "expected.json").read_text())[name]
    seg = Segmenter.load(release / name, device="cpu")
    assert seg.card.calibration == CALIBRATION
    assert seg.calibration == want["calibration"] and seg.model_info == want["model_info"]
    skip_unless_same_kernels(name, seg, release / "image.png")
    same(summary(seg.predict(release / "image.png")), want["automatic"])
    # Box prompts: the release's masks without today's refinement; the score is now a
    # quality estimate (serving.inference.quality), another definition than the release's.
    unrefined = seg.with_box_scale(True, refine=False)
    same(summary(unrefined.predict(release / "image.png", boxes=BOXES)), want["prompt"],
         scores=False)
    today = seg.predict(release / "image.png", boxes=BOXES)
    assert today.labels.tolist() == want["prompt"]["labels"]
    assert ((today.scores > 0) & (today.scores <= 1)).all()


@pytest.mark.parametrize("given, loads", [
    ("tiny.json", "tiny.auto.onnx"), ("tiny.int8.json", "tiny.int8.auto.onnx"),
    (".", "tiny.auto.onnx"), ("tiny.int8.prompt.onnx", "tiny.int8.auto.onnx")])
def test_every_export_file_and_the_folder_load(release, given, loads) -> None:
    """The sidecars, the folder (its fp32 export first) and either graph name one export."""
    want = json.loads((release / "expected.json").read_text())[loads]
    seg = Segmenter.load(release / given, device="cpu")
    assert seg.card.precision == ("int8" if "int8" in loads else "fp32")
    skip_unless_same_kernels(loads, seg, release / "image.png")
    same(summary(seg.predict(release / "image.png")), want["automatic"])
