"""YOLO and Label Studio readers and writers (no model): known boxes, bad lines and tasks
skipped by name, format detection, and the encodings checked against their decoders."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from serving.errors import InputError
from serving.formats.boxsets import detect_format, read_boxes
from serving.formats.labelstudio import (
    brush_result,
    ls_rle_to_mask,
    polygon_result,
    result_names,
)
from serving.formats.yolo import read_yolo, seg_line


def _image(path, w, h, orientation=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {}
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif
    Image.fromarray(np.full((h, w, 3), 80, np.uint8)).save(path, **kwargs)


@pytest.fixture()
def yolo_dir(tmp_path):
    root = tmp_path / "ds"
    _image(root / "images" / "a.png", 100, 50)
    _image(root / "images" / "sub" / "b.jpg", 64, 32, orientation=6)  # upright: 32 x 64
    _image(root / "images" / "empty.png", 20, 20)
    (root / "labels" / "sub").mkdir(parents=True)
    (root / "classes.txt").write_text("cat\ndog\n")
    (root / "labels" / "a.txt").write_text(
        "1 0.5 0.5 0.2 0.4\n"            # good: [40, 15, 20, 20]
        "0 0.5 0.5 0.2\n"                # 4 fields
        "0 0.5 0.5 0.2 0.2 0.9\n"        # 6 fields
        "5 0.5 0.5 0.2 0.2\n"            # class outside the 2 names
        "0 1.2 0.5 0.2 0.2\n"            # outside 0-1
        "0 0.5 0.5 0 0.2\n"              # zero width
        "\n"
        "0 0.25 0.25 0.5 0.5\n")         # good: [0, 0, 50, 25]
    (root / "labels" / "sub" / "b.txt").write_text("0 0.5 0.5 1 1\n")
    (root / "labels" / "orphan.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    return root


def test_yolo_boxes_in_pixels_of_the_upright_image(yolo_dir):
    boxes = read_yolo(yolo_dir, yolo_dir / "images")
    data = boxes.dataset
    assert [c["name"] for c in data["categories"]] == ["cat", "dog"]
    images = {img["file_name"]: img for img in data["images"]}
    assert set(images) == {"a.png", "sub/b.jpg", "empty.png"}
    assert (images["sub/b.jpg"]["width"], images["sub/b.jpg"]["height"]) == (32, 64)
    by_image = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append((ann["category_id"], ann["bbox"]))
    assert by_image[images["a.png"]["id"]] == [(2, pytest.approx([40, 15, 20, 20])),
                                               (1, pytest.approx([0, 0, 50, 25]))]
    assert by_image[images["sub/b.jpg"]["id"]] == [(1, pytest.approx([0, 0, 32, 64]))]


def test_yolo_bad_lines_are_skipped_by_file_and_line(yolo_dir):
    skipped = dict(read_yolo(yolo_dir / "labels", yolo_dir / "images").skipped)
    a = str(yolo_dir / "labels" / "a.txt")
    assert "4 fields" in skipped[f"{a} line 2"]
    assert "6 fields" in skipped[f"{a} line 3"]
    assert "class index 5 is outside the 2 class names" in skipped[f"{a} line 4"]
    assert "outside 0-1" in skipped[f"{a} line 5"]
    assert "zero width" in skipped[f"{a} line 6"]
    assert "no image" in skipped[str(yolo_dir / "labels" / "orphan.txt")]
    assert len(skipped) == 6 and all("\n" not in r for r in skipped.values())


def test_yolo_names_from_data_yaml_and_missing(tmp_path, yolo_dir):
    (yolo_dir / "classes.txt").unlink()
    (yolo_dir / "data.yaml").write_text("names:\n  0: cat\n  1: dog\n")
    assert read_yolo(yolo_dir, yolo_dir / "images").extra["names"] == ["cat", "dog"]
    (yolo_dir / "data.yaml").unlink()
    with pytest.raises(InputError, match="no classes.txt or data.yaml"):
        read_yolo(yolo_dir, yolo_dir / "images")


def test_yolo_seg_line_normalises_the_largest_polygon():
    small, big = [0, 0, 2, 0, 2, 2], [10, 10, 30, 10, 30, 20]
    assert seg_line(2, [small, big], 100, 50) == \
        "2 0.100000 0.200000 0.300000 0.200000 0.300000 0.400000"


def _task(tid, image, rects, cancelled=False):
    return {"id": tid, "data": {"image": image}, "annotations": [
        {"was_cancelled": cancelled, "result": [
            {"id": f"r{i}", "type": "rectanglelabels", "from_name": "box", "to_name": "img",
             "original_width": 200, "original_height": 100,
             "value": dict(v, rectanglelabels=[label])} for i, (label, v) in enumerate(rects)]}]}


def test_labelstudio_export_boxes_labels_and_bad_tasks(tmp_path):
    images = tmp_path / "images"
    _image(images / "photo.png", 200, 100)
    rect = {"x": 10, "y": 20, "width": 30, "height": 40}
    tasks = [
        _task(7, "/data/upload/3/0a1b2c3d-photo.png",
              [("cat", rect), ("dog", {**rect, "width": 0}), ("cat", {**rect, "rotation": 30})]),
        {"id": 8, "data": {"text": "no picture"}},
        _task(9, "/data/upload/3/photo.png", [("dog", rect)], cancelled=True),
    ]
    path = tmp_path / "export.json"
    path.write_text(json.dumps(tasks))
    boxes = read_boxes(path, images)
    assert boxes.source == "labelstudio"
    data = boxes.dataset
    assert [img["file_name"] for img in data["images"]] == ["photo.png", "photo.png"]
    assert [(a["category_id"], a["bbox"]) for a in data["annotations"]] == [
        (1, pytest.approx([20, 20, 60, 40]))]  # the cancelled annotation gives no box
    assert data["categories"] == [{"id": 1, "name": "cat"}]
    skipped = dict(boxes.skipped)
    assert "zero width" in skipped[f"{path} task 7 result r1"]
    assert "rotated" in skipped[f"{path} task 7 result r2"]
    assert "no image" in skipped[f"{path} task 8"]
    assert boxes.extra["results"][1] == {"id": "r0", "to_name": "img"}


def test_detect_format_by_shape(tmp_path, yolo_dir):
    (tmp_path / "coco.json").write_text('{"images": []}')
    (tmp_path / "ls.json").write_text(' [{"data": {}}]')
    (tmp_path / "notes.xml").write_text("<annotation/>")
    assert detect_format(yolo_dir) == "yolo"
    assert detect_format(tmp_path / "coco.json") == "coco"
    assert detect_format(tmp_path / "ls.json") == "labelstudio"
    with pytest.raises(InputError, match="neither a COCO JSON"):
        detect_format(tmp_path / "notes.xml")
    with pytest.raises(InputError, match="missing.json: file not found"):
        detect_format(tmp_path / "missing.json")


@pytest.mark.skipif(importlib.util.find_spec("label_studio_converter") is None,
                    reason="label-studio-converter (extra labelstudio) is not installed")
def test_brush_result_round_trips_through_the_converter_decoder():
    mask = np.zeros((37, 53), bool)
    mask[5:20, 7:30] = True
    mask[30, 50] = True
    result = brush_result(mask, "cat", 0.912345678, "mask", "img", "id1")
    assert result["type"] == "brushlabels" and result["value"]["brushlabels"] == ["cat"]
    assert (result["original_width"], result["original_height"]) == (53, 37)
    assert result["score"] == 0.91235
    assert np.array_equal(ls_rle_to_mask(result["value"]["rle"], 37, 53), mask)


def test_polygon_result_in_percent():
    result = polygon_result([[20, 10, 60, 10, 60, 50]], (200, 100), "dog", 0.5, "poly", "img",
                            "id2")
    assert result["value"]["points"] == [[10.0, 10.0], [30.0, 10.0], [30.0, 50.0]]
    assert result["value"]["polygonlabels"] == ["dog"] and result["type"] == "polygonlabels"
    assert polygon_result([], (200, 100), "dog", 0.5, "p", "i", "x") is None


def test_result_names_from_the_labelling_config():
    config = ('<View><Image name="img" value="$image"/><RectangleLabels name="box" '
              'toName="img"/><BrushLabels name="tag" toName="img"><Label value="cat"/>'
              '</BrushLabels></View>')
    assert result_names(config, "brush") == ("tag", "img")
    assert result_names(config, "polygon") == ("polygon", None)
    assert result_names(None, "brush") == ("mask", None)
    with pytest.raises(InputError, match="not valid XML"):
        result_names("<View>", "brush")


def test_polygon_percent_rasterises_to_the_same_mask():
    """Percent polygon points (6 decimals, rounded up), scaled back, rasterise (pycocotools)
    to the same pixels as the pixel polygon, vertices on pixel edges included."""
    poly = [12.5, 3.25, 40.75, 9.5, 30.0, 44.0, 8.0, 30.0]
    result = polygon_result([poly], (64, 48), "a", 1.0, "p", "i", "x")
    back = [v for x, y in result["value"]["points"] for v in (x / 100 * 64, y / 100 * 48)]
    a = mask_util.decode(mask_util.merge(mask_util.frPyObjects([poly], 48, 64)))
    b = mask_util.decode(mask_util.merge(mask_util.frPyObjects([back], 48, 64)))
    assert np.array_equal(a, b) and a.sum() > 800
