"""``Prediction``: COCO results with RLE (decoded back with pycocotools, loaded by COCO.loadRes)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from serving import Prediction


@pytest.fixture()
def pred() -> Prediction:
    masks = np.zeros((3, 30, 40), bool)
    masks[0, 2:10, 3:20] = True
    masks[1, 15:29, 0:40] = True
    masks[2, 5, 5] = True
    masks[2, 20:25, 30:33] = True  # two separate parts
    boxes = np.array([[3, 2, 20, 10], [0.5, 15.25, 40, 29], [5, 5, 33, 25]], np.float32)
    return Prediction(boxes, np.array([0.9, 0.5, 0.25], np.float32),
                      np.array([0, 2, 1], np.int64), masks, ("cat", "dog", "bird"))


def test_basic_properties(pred):
    assert len(pred) == 3
    assert pred.image_size == (30, 40)
    assert pred.areas.tolist() == [8 * 17, 14 * 40, 1 + 15]
    assert pred.label_names == ["cat", "bird", "dog"]


def test_to_coco_rle_round_trip_and_fields(pred):
    results = pred.to_coco(image_id=7)
    assert len(results) == 3
    json.dumps(results)  # JSON-ready: counts are str
    for i, r in enumerate(results):
        assert r["image_id"] == 7
        assert isinstance(r["segmentation"]["counts"], str)
        assert r["segmentation"]["size"] == [30, 40]
        rle = dict(r["segmentation"], counts=r["segmentation"]["counts"].encode())
        decoded = mask_util.decode(rle).astype(bool)
        assert np.array_equal(decoded, pred.masks[i])
        x1, y1, x2, y2 = pred.boxes[i].tolist()
        assert r["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=0.01)
        assert r["score"] == pytest.approx(float(pred.scores[i]), abs=1e-5)
    # default category ids: label + 1
    assert [r["category_id"] for r in results] == [1, 3, 2]


def test_to_coco_category_mapping(pred):
    results = pred.to_coco(1, category_ids=[17, 18, 90])
    assert [r["category_id"] for r in results] == [17, 90, 18]


def test_to_coco_accepted_by_loadres(pred):
    gt = COCO()
    gt.dataset = {
        "images": [{"id": 7, "height": 30, "width": 40, "file_name": "x.png"}],
        "annotations": [],
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(pred.class_names)],
    }
    gt.createIndex()
    results = pred.to_coco(7)
    dt = gt.loadRes(results)
    anns = dt.loadAnns(dt.getAnnIds(imgIds=[7]))
    assert len(anns) == 3
    # with a bbox present, loadRes takes the area from it (pycocotools' rule)
    for ann in anns:
        assert ann["area"] == pytest.approx(ann["bbox"][2] * ann["bbox"][3])
    for ann, mask in zip(sorted(anns, key=lambda a: a["id"]), pred.masks):
        assert np.array_equal(dt.annToMask(ann).astype(bool), mask)


def test_to_coco_empty():
    empty = Prediction(np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                       np.zeros(0, np.int64), np.zeros((0, 10, 10), bool), ("a",))
    assert empty.to_coco(3) == []
    assert empty.areas.shape == (0,)
