"""The calibration a trained model stores: the F1-best threshold of its validation, prompted
score quantiles and the training boxes' sizes at the network input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from serving.inference.quality import SCORE_VERSION
from serving.inference.transforms import resized_shape
from serving.model.model_file import read_checkpoint_card
from training.evaluate import main
from training.score_calibration import object_sizes

pytestmark = pytest.mark.slow


def test_the_final_model_stores_its_validation_calibration(tiny_run) -> None:
    calib = read_checkpoint_card(tiny_run.out / "model_final.safetensors").calibration.to_dict()
    metrics = json.loads((tiny_run.out / "metrics.json").read_text())
    assert calib["score_threshold"] == pytest.approx(metrics["segm/F1_threshold"], abs=1e-4)
    assert calib["f1"] == pytest.approx(metrics["segm/F1"], abs=0.01)
    assert set(calib["prompt_scores"]) == {"p10", "p50", "p90"}
    assert 0.0 <= calib["prompt_scores"]["p10"] <= calib["prompt_scores"]["p90"] <= 1.0
    assert calib["prompt_score"] == SCORE_VERSION  # the definition they were measured with
    assert calib["object_sizes"] == object_sizes(tiny_run.cfg.data.train_json,
                                                 tiny_run.cfg.data.min_sizes,
                                                 tiny_run.cfg.data.max_size)
    card = read_checkpoint_card(tiny_run.out / "model_final.safetensors")
    assert card.provenance.made_by == "train" and card.provenance.details["step"] > 0
    assert card.category_ids is not None and len(card.category_ids) == len(card.class_names)


def test_object_sizes_are_box_sides_at_the_training_input(tmp_path: Path) -> None:
    """Hand-made: two 100x200 (h x w) images resized to short side 50 (scale 0.5)."""
    coco = {"images": [{"id": 1, "file_name": "a.png", "height": 100, "width": 200},
                       {"id": 2, "file_name": "b.png", "height": 100, "width": 200}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 40, 10]},
                            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [0, 0, 20, 20]},
                            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [5, 5, 60, 60]}],
            "categories": [{"id": 1, "name": "x"}]}
    path = tmp_path / "train.json"
    path.write_text(json.dumps(coco))
    assert resized_shape(100, 200, 50, 1000) == (50, 100)
    sides = np.array([20.0, 20.0, 60.0]) * 0.5  # sqrt(40*10), sqrt(20*20), sqrt(60*60)
    got = object_sizes(path, [40, 60], 1000)  # the training sizes' mean, 50
    assert got == {k: pytest.approx(float(np.percentile(sides, q)), abs=1e-3)
                   for k, q in (("p10", 10), ("p50", 50), ("p90", 90))}


def test_eval_calibrate_updates_the_checkpoint_and_keeps_its_sizes(tiny_run, tiny_data,
                                                                   tmp_path: Path) -> None:
    model = tmp_path / "m.safetensors"
    shutil.copy(tiny_run.out / "model_final.safetensors", model)
    before = read_checkpoint_card(model).calibration.to_dict()
    assert main(["--model", str(model), "--annotations", str(tiny_data.val_json), "--images",
                 str(tiny_data.images), "--device", "cpu", "--calibrate"]) == 0
    after = read_checkpoint_card(model).calibration.to_dict()
    assert after["object_sizes"] == before["object_sizes"]
    # training measured its prompted scores at the per-box scale of the saved model, as
    # `sim label` and `sim eval --calibrate` run it: the same reference
    assert after["prompt_scores"] == pytest.approx(before["prompt_scores"], abs=1e-4)
    assert after["score_threshold"] == pytest.approx(before["score_threshold"], abs=1e-4)
    assert after["validation"] == str(tiny_data.val_json)
    history = read_checkpoint_card(model).history
    assert [h.made_by for h in history] == ["train", "evaluate --calibrate"]
    assert history[-1].source == str(tiny_data.val_json) and history[-1].created
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"x")
    assert main(["--model", str(onnx), "--annotations", str(tiny_data.val_json), "--images",
                 str(tiny_data.images), "--calibrate"]) == 1


def test_info_prints_the_calibration(tiny_run, capsys) -> None:
    from serving.cli.dispatch import main as sim

    model = tiny_run.out / "model_final.safetensors"
    calib = read_checkpoint_card(model).calibration.to_dict()
    assert sim(["info", str(model)]) == 0
    text = capsys.readouterr().out
    assert f"score threshold: {calib['score_threshold']} (F1 {calib['f1']} %" in text
    sizes = calib["object_sizes"]
    assert f"p10/p50/p90 = {sizes['p10']} / {sizes['p50']} / {sizes['p90']} px" in text


def test_info_compares_a_dataset_with_the_training_objects(tiny_run, tiny_data, capsys) -> None:
    from serving.cli.dispatch import main as sim

    model = str(tiny_run.out / "model_final.safetensors")
    train_p50 = read_checkpoint_card(model).calibration.to_dict()["object_sizes"]["p50"]
    assert sim(["info", model, "--annotations", str(tiny_data.train_json)]) == 0
    text = capsys.readouterr().out
    assert "boxes, sqrt(w*h) at the model's input p10/p50/p90" in text
    assert "note:" not in text  # the training data at (about) the training size
    assert sim(["info", model, "--annotations", str(tiny_data.train_json), "--image-size",
                "32"]) == 0  # a quarter of the size: objects far smaller than in training
    text = capsys.readouterr().out
    assert "smaller than in training" in text and f"({train_p50:.0f} px)" in text
