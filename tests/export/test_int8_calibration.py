"""Calibration images for INT8: folder and COCO JSON sources, sampling, the content hash, the
feeds' shapes, and one-line errors for bad calibration input. No quantisation here (fast)."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from export_images import random_image
from PIL import Image

from export.calibration import _spaced, calibration_feeds, load_calibration_set
from export.tensorrt import CalibrationBatches, calibration_shapes
from serving.backends.exported import read_sidecar
from serving.errors import InputError


@pytest.fixture()
def image_folder(tmp_path):
    folder = tmp_path / "cal"
    (folder / "sub").mkdir(parents=True)
    for i in range(5):
        target = folder / "sub" if i == 4 else folder
        Image.fromarray(random_image(60 + 10 * i, 80, i)).save(target / f"im{i}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def _coco(folder, boxes=True):
    images = [{"id": i + 1, "file_name": f"im{i}.png", "width": 80, "height": 60 + 10 * i}
              for i in range(4)]
    anns = [{"id": 1, "image_id": 2, "bbox": [5, 6, 20, 30], "category_id": 1},
            {"id": 2, "image_id": 2, "bbox": [10, 10, -3, 4], "category_id": 1},  # bad: skipped
            {"id": 3, "image_id": 3, "bbox": [0, 0, 40, 40], "category_id": 1}] if boxes else []
    path = folder / "cal.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "a"}]}))
    return path


def test_spaced_indices_cover_the_set():
    assert _spaced(10, 3) == [0, 4, 9] or _spaced(10, 3) == [0, 5, 9]
    assert _spaced(4, 10) == [0, 1, 2, 3]
    assert _spaced(100, 64)[0] == 0 and _spaced(100, 64)[-1] == 99
    assert len(_spaced(100, 64)) == 64


def test_folder_is_searched_recursively_and_hashed_by_content(image_folder, tmp_path):
    cal = load_calibration_set(image_folder, count=64)
    assert cal.available == 5 and len(cal.paths) == 5  # the .txt is not an image
    assert {p.name for p in cal.paths} == {f"im{i}.png" for i in range(5)}
    assert all(b is None for b in cal.boxes)
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in cal.paths]
    assert cal.sha256 == hashlib.sha256("\n".join(digests).encode()).hexdigest()
    record = cal.to_dict()
    assert record["count"] == 5 and record["sha256"] == cal.sha256
    # Same bytes elsewhere: same hash; one changed image: another hash.
    copy = shutil.copytree(image_folder, tmp_path / "copy")
    assert load_calibration_set(copy).sha256 == cal.sha256
    Image.fromarray(random_image(60, 80, 99)).save(copy / "im0.png")
    assert load_calibration_set(copy).sha256 != cal.sha256
    assert len(load_calibration_set(image_folder, count=2).paths) == 2


def test_coco_json_images_and_boxes(image_folder):
    path = _coco(image_folder)
    cal = load_calibration_set(path, count=10)
    assert [p.name for p in cal.paths] == ["im0.png", "im1.png", "im2.png", "im3.png"]
    assert cal.boxes[0] is None
    np.testing.assert_allclose(cal.boxes[1], [[5, 6, 25, 36]])  # XYWH -> XYXY, bad box skipped
    np.testing.assert_allclose(cal.boxes[2], [[0, 0, 40, 40]])
    # The images may live elsewhere: --calibration-images.
    moved = image_folder.parent / "elsewhere"
    moved.mkdir()
    json_only = moved / "cal.json"
    json_only.write_text(path.read_text())
    cal2 = load_calibration_set(json_only, images_root=image_folder)
    assert cal2.sha256 == cal.sha256


@pytest.mark.parametrize("case, match", [
    ("missing", "not found"),
    ("empty", "no images found"),
    ("no_images_json", "no images found"),
    ("unreadable", "bad.png"),
    ("missing_file_json", "'ghost.png' not found"),
    ("not_json", "not a folder or a .json"),
    ("count", "at least 1"),
])
def test_bad_calibration_input_is_one_line(tmp_path, image_folder, case, match):
    source, count = tmp_path / "missing", 8
    if case == "empty":
        source = tmp_path / "empty"
        source.mkdir()
    elif case == "no_images_json":
        source = tmp_path / "none.json"
        source.write_text(json.dumps({"images": [], "annotations": []}))
    elif case == "unreadable":
        (image_folder / "bad.png").write_bytes(b"\x89PNG but not really")
        source = image_folder
    elif case == "missing_file_json":
        source = tmp_path / "ghost.json"
        source.write_text(json.dumps({"images": [{"id": 1, "file_name": "ghost.png"}]}))
    elif case == "not_json":
        source = image_folder / "notes.txt"
    elif case == "count":
        source, count = image_folder, 0
    with pytest.raises(InputError, match=match) as info:
        load_calibration_set(source, count=count)
    assert "\n" not in str(info.value) and str(info.value).startswith("calibration")


def test_feeds_follow_the_graph_inputs(tiny_export, image_folder):
    sidecar = read_sidecar(tiny_export.sidecar)
    cal = load_calibration_set(_coco(image_folder), count=4)
    auto = list(calibration_feeds(cal, sidecar, "automatic"))
    assert len(auto) == 4
    for feed in auto:
        assert set(feed) == {"images", "image_sizes"}
        assert feed["images"].dtype == np.float32 and feed["images"].shape[:2] == (1, 3)
        assert feed["images"].shape[2] % 32 == 0 and feed["images"].shape[3] % 32 == 0
        h, w = feed["image_sizes"][0]
        assert feed["images"][0, :, h:].max(initial=0) == 0  # zero padding below the image
        assert feed["images"][0, :, :h, :w].max() > 0
    prompt = list(calibration_feeds(cal, sidecar, "prompt"))
    assert prompt[0]["boxes"].shape == (1, 3, 4)  # no COCO boxes: three default prompts
    assert prompt[1]["boxes"].shape == (1, 1, 4) and (prompt[1]["box_labels"] == -1).all()
    scale = prompt[1]["image_sizes"][0, 0] / 70  # image 1 is 70 px high
    np.testing.assert_allclose(prompt[1]["boxes"][0, 0], np.array([5, 6, 25, 36]) * scale,
                               rtol=1e-2)


def test_tensorrt_batches_have_the_calibration_shapes(tiny_export, image_folder, tmp_path):
    sidecar = read_sidecar(tiny_export.sidecar)
    cal = load_calibration_set(_coco(image_folder), count=2)
    shapes = calibration_shapes(sidecar, ["images", "image_sizes", "boxes", "box_labels"])
    assert shapes["images"] == (1, 3, 256, 256) and shapes["boxes"] == (1, 10, 4)
    batches = CalibrationBatches(cal, sidecar, "prompt", shapes, tmp_path / "x.calib")
    first = batches.next_batch()
    assert {k: v.shape for k, v in first.items()} == shapes
    assert all(v.flags["C_CONTIGUOUS"] for v in first.values())
    assert (first["boxes"][0, 2:] == first["boxes"][0, 2]).all()  # 3 defaults, last repeated
    assert not (first["boxes"][0, 1] == first["boxes"][0, 2]).all()
    assert batches.next_batch() is not None and batches.next_batch() is None
    assert batches.read_cache() is None
    batches.write_cache(b"cache")
    assert batches.read_cache() == b"cache"


@pytest.mark.parametrize("extra, match", [
    (["--int8"], "--int8 needs --calibration"),
    (["--calibration", "x"], "used by --int8"),
    (["--int8", "--calibration", "EMPTY"], "no images found"),
    (["--int8", "--calibration", "MISSING"], "not found"),
    (["--int8", "--calibration", "EMPTY", "--int8-calibrator"], "--format tensorrt"),
    (["--int8", "--calibration", "STRIP"], "aspect ratio of 50:1, above this model's limit"),
])
def test_export_cli_refuses_bad_int8_options_before_exporting(tiny_checkpoint, tmp_path, capsys,
                                                              extra, match):
    from export.__main__ import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "strip").mkdir()  # one 1000x20 image: beyond the tiny model's 256/8 = 32:1
    Image.fromarray(np.zeros((20, 1000, 3), np.uint8)).save(tmp_path / "strip" / "s.png")
    names = {"EMPTY": tmp_path / "empty", "MISSING": tmp_path / "gone",
             "STRIP": tmp_path / "strip"}
    extra = [str(names.get(a, a)) for a in extra]
    out = tmp_path / "out"
    assert main(["--checkpoint", str(tiny_checkpoint), "--output", str(out), *extra]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and match in err
    assert not list(out.glob("*.onnx"))  # nothing exported
