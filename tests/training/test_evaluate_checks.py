"""``sim eval`` refuses what it cannot do before any work: an evaluation that cannot support
``--calibrate`` (the model's calibration is kept), ``--max-images`` below 1, an unwritable
``--output``, a malformed annotation file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving import Segmenter
from serving.model.card import Calibration
from serving.model.model_file import recalibrate_checkpoint
from training.evaluate import main


def _coco(root: Path, annotated: bool = True, **overrides) -> Path:
    (root / "images").mkdir(parents=True)
    Image.fromarray(np.full((64, 80, 3), 90, np.uint8)).save(root / "images" / "a.png")
    data = {"images": [{"id": 1, "file_name": "a.png", "height": 64, "width": 80}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20],
                             "area": 400, "iscrowd": 0,
                             "segmentation": [[5, 5, 25, 5, 25, 25, 5, 25]]}] if annotated
            else [],
            "categories": [{"id": 1, "name": "disc"}], **overrides}
    path = root / "val.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture()
def calibrated(tiny_checkpoint, tmp_path) -> Path:
    path = tmp_path / "model.safetensors"
    path.write_bytes(Path(tiny_checkpoint).read_bytes())
    recalibrate_checkpoint(path, Calibration(score_threshold=0.42, f1=80.0))
    return path


@pytest.fixture()
def no_model(monkeypatch):
    monkeypatch.setattr(Segmenter, "load", lambda *a, **k: pytest.fail("model loaded"))


@pytest.mark.parametrize("annotated, max_images, reason", [
    (False, None, "none of its 1 images has an annotation"),
    (True, 0, "--max-images 0: must be at least 1"),
    (True, -1, "--max-images -1: must be at least 1"),
])
def test_calibrate_on_an_evaluation_without_annotations_keeps_the_calibration(
        calibrated, tmp_path, capsys, no_model, annotated, max_images, reason) -> None:
    val = _coco(tmp_path / "data", annotated)
    before = calibrated.read_bytes()
    extra = [] if max_images is None else ["--max-images", str(max_images)]
    code = main(["--model", str(calibrated), "--annotations", str(val), "--images",
                 str(tmp_path / "data" / "images"), "--calibrate", *extra])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and reason in err and err.count("\n") == 1
    if max_images is None:
        assert "its calibration is kept as it was" in err
    assert calibrated.read_bytes() == before


def test_an_unwritable_output_is_refused_before_the_evaluation(calibrated, tmp_path, capsys,
                                                               no_model) -> None:
    val = _coco(tmp_path / "data")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main(["--model", str(calibrated), "--annotations", str(val), "--images",
                 str(tmp_path / "data" / "images"), "--output", str(blocker / "m.json")])
    err = capsys.readouterr().err
    assert code == 1 and "not writable" in err and err.count("\n") == 1


@pytest.mark.parametrize("override, message", [
    ({"annotations": None}, "'annotations' is NoneType; it must be a list"),
    ({"images": [{"id": 1, "file_name": "a.png", "height": 0, "width": 80}]},
     "images[0] needs integer 'id', 'height' and 'width' (at least 1)"),
])
def test_malformed_annotations_are_a_one_line_error(calibrated, tmp_path, capsys, override,
                                                    message) -> None:
    val = _coco(tmp_path / "data", **override)
    code = main(["--model", str(calibrated), "--annotations", str(val), "--images",
                 str(tmp_path / "data" / "images"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and message in err and err.count("\n") == 1, err
