"""``Prediction``: COCO results with RLE (decoded back with pycocotools, loaded by COCO.loadRes)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from serving import Prediction
from serving.masks import InstanceMasks
from serving.prediction import format_score


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


# ------------------------------------------------------------------ masks kept as crops
def random_masks(seed: int, count: int = 6, size: tuple[int, int] = (23, 31)) -> np.ndarray:
    """(count, H, W) bool: random rectangles of random density, plus the edge cases of
    column-major RLE (a run crossing from one column's bottom to the next column's top, a
    full mask, the last pixel alone, an empty mask)."""
    rng = np.random.default_rng(seed)
    h, w = size
    masks = np.zeros((count, h, w), bool)
    for k in range(count):
        y0, y1 = sorted(rng.integers(0, h + 1, 2))
        x0, x1 = sorted(rng.integers(0, w + 1, 2))
        masks[k, y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) < rng.random()
    masks[0, -3:, 4] = masks[0, :2, 5] = True
    masks[1] = True
    masks[2] = False
    masks[2, -1, -1] = True
    masks[3] = False
    return masks


@pytest.mark.parametrize("seed", range(5))
def test_crops_give_the_same_prediction_as_dense_masks(seed) -> None:
    dense = random_masks(seed)
    n = len(dense)
    boxes = np.tile(np.array([[1, 2, 5, 6]], np.float32), (n, 1))
    args = (boxes, np.linspace(0.9, 0.2, n).astype(np.float32), np.arange(n) % 3)
    pred = Prediction(*args, InstanceMasks.from_dense(dense), ("a", "b", "c"))
    assert np.array_equal(pred.masks, dense) and pred.image_size == dense.shape[1:]
    assert pred.areas.tolist() == dense.sum(axis=(1, 2)).tolist()
    assert all(np.array_equal(pred.mask(i), dense[i]) for i in range(n))
    expected = mask_util.encode(np.asfortranarray(dense.transpose(1, 2, 0).astype(np.uint8)))
    got = pred.to_coco(1)
    assert [r["segmentation"]["counts"] for r in got] == [
        e["counts"].decode("ascii") for e in expected]
    assert got == Prediction(*args, dense, ("a", "b", "c")).to_coco(1)


def test_crops_are_tight_and_select_keeps_them() -> None:
    dense = random_masks(1)
    masks = InstanceMasks.from_dense(dense)
    assert masks.crops[1].shape == dense.shape[1:] and masks.crops[3].shape == (0, 0)
    assert masks.crops[2].shape == (1, 1) and masks.box(2) == (22, 30, 23, 31)
    assert masks.nbytes == sum(c.size for c in masks.crops) < dense.size
    pred = Prediction(np.zeros((6, 4), np.float32), np.arange(6, dtype=np.float32),
                      np.zeros(6, np.int64), masks)
    keep = pred.scores >= 3
    kept = pred.select(keep)
    assert kept.instance_masks.crops[0] is masks.crops[3]  # no copy, nothing made dense
    assert len(kept) == 3 and np.array_equal(kept.masks, dense[keep])
    assert np.array_equal(pred.select([5, 0]).masks, dense[[5, 0]])
    both = InstanceMasks.concatenate([masks.select(slice(0, 2)), masks.select(slice(2, None))])
    assert np.array_equal(both.dense(), dense)


def test_full_size_masks_are_built_only_when_asked() -> None:
    """A 20000 x 20000 image with 3 small masks: everything but ``masks`` works on the crops
    (12 MB of traced allocations at most, where full masks would take 1.2 GB)."""
    import tracemalloc

    size = (20000, 20000)
    crops = [np.ones((5, 7), bool), np.eye(30, dtype=bool), np.zeros((0, 0), bool)]
    masks = InstanceMasks(crops, [(19995, 19993), (100, 200), (0, 0)], size)
    pred = Prediction(np.zeros((3, 4), np.float32), np.ones(3, np.float32),
                      np.zeros(3, np.int64), masks, ("x",))
    tracemalloc.start()
    try:
        results = pred.to_coco(5)
        areas = pred.areas
        kept = pred.select(areas > 0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 12 << 20
    assert areas.tolist() == [35, 30, 0] and len(kept) == 2 and pred.image_size == size
    assert not pred._dense  # the (3, 20000, 20000) array was never built
    decoded = mask_util.decode(dict(results[0]["segmentation"], counts=results[0][
        "segmentation"]["counts"].encode()))
    assert decoded.shape == size and decoded[19995:, 19993:].all() and decoded.sum() == 35


def test_masks_are_built_once() -> None:
    pred = Prediction(np.zeros((1, 4), np.float32), np.ones(1, np.float32),
                      np.zeros(1, np.int64), np.ones((1, 4, 5), bool))
    assert pred.masks is pred.masks


def test_inconsistent_instances_are_refused() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        InstanceMasks([np.ones((3, 3), bool)], [(8, 0)], (10, 10))
    with pytest.raises(ValueError, match="one of each per instance"):
        Prediction(np.zeros((2, 4), np.float32), np.ones(2, np.float32),
                   np.zeros(2, np.int64), np.zeros((1, 4, 4), bool))


def test_edits_to_the_built_masks_are_the_predictions_masks() -> None:
    """``pred.masks`` was a plain array before masks were kept as crops: code that edits it
    in place still changes what the prediction reports."""
    dense = random_masks(2)
    pred = Prediction(np.zeros((6, 4), np.float32), np.ones(6, np.float32),
                      np.zeros(6, np.int64), InstanceMasks.from_dense(dense))
    pred.masks[0] = False
    pred.masks[3, 1, 2] = True
    expected = dense.copy()
    expected[0] = False
    expected[3, 1, 2] = True
    assert pred.areas.tolist() == expected.sum(axis=(1, 2)).tolist()
    assert not pred.mask(0).any() and pred.mask(3)[1, 2]
    rles = mask_util.encode(np.asfortranarray(expected.transpose(1, 2, 0).astype(np.uint8)))
    assert [r["segmentation"]["counts"] for r in pred.to_coco(1)] == [
        r["counts"].decode("ascii") for r in rles]
    assert np.array_equal(pred.select([3]).masks, expected[[3]])


@pytest.mark.parametrize("value, text", [
    (0.0, "0.00"), (0.5, "0.50"), (0.0999, "0.10"), (0.0949, "0.095"), (0.027, "0.027"),
    (0.00999, "0.010"), (0.0009, "<0.001"), (1e-6, "<0.001"), (float("nan"), "nan")])
def test_format_score_keeps_two_significant_digits_of_small_scores(value, text):
    assert format_score(value) == text
