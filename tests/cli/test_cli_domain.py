"""Warnings when the user's data is unlike the model's: object sizes and prompt scores."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from cli_data import one_torch_thread, shapes_dataset
from sim_testing import make_tiny_checkpoint

from serving.cli.label import main
from serving.inference.domain import (
    box_sizes,
    calibration_of,
    quantiles,
    score_advice,
    size_advice,
    suggested_size,
)
from serving.inference.quality import SCORE_VERSION
from serving.model.card import Calibration
from serving.model.model_file import recalibrate_checkpoint
from serving.prediction import format_score


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_torch_thread()


def test_box_sizes_at_the_network_input():
    boxes = np.array([[0, 0, 40, 10], [10, 10, 30, 30]])  # sqrt(400) = 20 px each
    assert box_sizes([(boxes, (100, 200))], 50, 1000).tolist() == [10.0, 10.0]  # scale 0.5
    assert box_sizes([(boxes, (100, 200))], 200, 300).tolist() == [30.0, 30.0]  # cap: 1.5
    assert quantiles([]) == {} and quantiles([1, 2, 3])["p50"] == 2.0


def test_an_image_of_extreme_aspect_is_left_out_of_the_statistics_not_fatal():
    boxes = np.array([[0, 0, 20, 20]], np.float32)
    sizes = box_sizes([(boxes, (100, 200)), (boxes, (96, 10**12))], 50, 1000)
    assert sizes.tolist() == [10.0]


def test_label_skips_an_image_whose_json_width_is_absurd(tmp_path, capsys):
    data_json = shapes_dataset(tmp_path / "data", num_images=2)
    data = json.loads(data_json.read_text())
    data["images"][1]["width"] = 10**12
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps(data))
    model = make_tiny_checkpoint(tmp_path / "tiny.safetensors")
    code = main(["--model", str(model), "--annotations", str(boxes), "--images",
                 str(tmp_path / "data" / "images"), "--output", str(tmp_path / "o.json"),
                 "--device", "cpu", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 3 and "1 images failed" in captured.out, captured
    assert "differs from the JSON's 1000000000000x96" in captured.err


def test_size_advice_suggests_an_image_size_only_past_the_factor():
    calib = Calibration(object_sizes={"p50": 40.0})
    assert size_advice(calib, np.full(5, 30.0), 256, 256) is None  # 1.33x: fine
    line = size_advice(calib, np.full(5, 20.0), 256, 256)  # 2x smaller
    assert line and "2.0x smaller than in training (40 px)" in line
    assert "--image-size 512 512" in line and suggested_size(2.0, 256, 256) == (512, 512)
    assert "larger" in size_advice(calib, np.full(5, 100.0), 256, 448)
    assert size_advice(Calibration(), np.full(5, 1.0), 256, 256) is None  # uncalibrated


def test_score_advice_says_out_of_domain_with_the_numbers():
    calib = Calibration(prompt_scores={"p50": 0.5}, prompt_score=SCORE_VERSION)
    assert score_advice(calib, [0.45] * 20) is None
    line = score_advice(calib, [0.1] * 20)
    assert line.startswith("out of domain: the median box score is 0.10 on these images "
                           "against 0.50 on the model's validation images")
    assert score_advice(calib, [0.1] * 5) is None  # too few boxes to judge
    small = dataclasses.replace(calib, prompt_scores={"p50": 0.027})  # small scores keep digits
    assert "is 0.0073 on these images against 0.027 on" in score_advice(small, [0.0073] * 20)
    assert "is 0.00 on these images" in score_advice(small, [0.0] * 20)
    # a reference measured with an earlier definition of the score is not compared
    assert score_advice(Calibration(prompt_scores={"p50": 0.5}), [0.1] * 20) is None
    assert score_advice(dataclasses.replace(calib, prompt_score="box"), [0.1] * 20) is None
    # the whole-image path's box scores (version None) only against a box-score reference
    assert score_advice(calib, [0.1] * 20, version=None) is None
    old = Calibration(prompt_scores={"p50": 0.5})
    assert score_advice(old, [0.1] * 20, version=None).startswith("out of domain")


def test_label_warns_when_scores_sit_far_below_the_validation_reference(tmp_path, capsys):
    """The same tiny model and images, once with a validation reference its scores here
    match, once with one they are far below: only the second run warns."""
    boxes = shapes_dataset(tmp_path / "data", num_images=4)
    model = make_tiny_checkpoint(tmp_path / "m.safetensors", detections=False)  # low scores
    args = ["--model", str(model), "--annotations", str(boxes), "--images",
            str(tmp_path / "data" / "images"), "--device", "cpu", "--no-progress"]
    assert main([*args, "--output", str(tmp_path / "a.json")]) == 0
    capsys.readouterr()
    scores = [a["score"] for a in json.loads((tmp_path / "a.json").read_text())["annotations"]]
    own = float(np.median(scores))
    recalibrate_checkpoint(model, Calibration(prompt_scores={"p50": own},
                                              prompt_score=SCORE_VERSION))
    assert main([*args, "--output", str(tmp_path / "b.json")]) == 0
    assert "out of domain" not in capsys.readouterr().err
    assert own < 0.3
    recalibrate_checkpoint(model, Calibration(prompt_scores={"p50": 0.9},
                                              prompt_score=SCORE_VERSION))
    assert main([*args, "--output", str(tmp_path / "c.json")]) == 0
    err = capsys.readouterr().err
    assert f"warning: out of domain: the median box score is {format_score(own)} on these " \
           "images against 0.90 on the model's validation images" in err
    # the whole-image path gives the model's box scores: not compared with this reference
    assert main([*args, "--box-scale", "off", "--output", str(tmp_path / "d.json")]) == 0
    assert "out of domain" not in capsys.readouterr().err
    from serving import Segmenter

    assert calibration_of(Segmenter.load(model, device="cpu")) == Calibration(
        prompt_scores={"p50": 0.9}, prompt_score=SCORE_VERSION)
