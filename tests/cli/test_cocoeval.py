"""evaluate_coco on hand-made cases with known answers."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from cli_data import rle

from serving.errors import DatasetError
from serving.formats.cocoeval import evaluate_coco, metric_keys


def _square(h, w, x0, y0, x1, y1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


@pytest.fixture()
def gt():
    """Two 64x64 images; a small (10x10) and a medium (40x40) square on image 1, one small
    square on image 2; masks equal the boxes."""
    specs = [(1, 1, (5, 5, 15, 15)), (2, 1, (20, 20, 60, 60)), (3, 2, (30, 30, 40, 40))]
    anns = []
    for ann_id, image_id, (x0, y0, x1, y1) in specs:
        anns.append({"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                     "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                     "segmentation": rle(_square(64, 64, x0, y0, x1, y1))})
    return {"images": [{"id": 1, "file_name": "a.png", "height": 64, "width": 64},
                       {"id": 2, "file_name": "b.png", "height": 64, "width": 64}],
            "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}


def _as_results(gt, score=1.0):
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
             "segmentation": a["segmentation"], "score": score} for a in gt["annotations"]]


def test_ground_truth_as_results_scores_one(gt):
    before = copy.deepcopy(gt)
    metrics = evaluate_coco(gt, _as_results(gt))
    assert set(metrics) == set(metric_keys())
    for t in ("bbox", "segm"):
        for m in ("AP", "AP50", "AP75", "APs", "APm"):
            assert metrics[f"{t}/{m}"] == pytest.approx(1.0)
        assert metrics[f"{t}/APl"] == -1.0  # no large object in the GT: COCO's "undefined"
    assert gt == before  # inputs untouched (COCOeval rewrites segmentations in place)


def test_empty_results_give_zero(gt, tmp_path):
    assert evaluate_coco(gt, []) == dict.fromkeys(metric_keys(), 0.0)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    assert evaluate_coco(path, [], iou_types=("segm",)) == dict.fromkeys(metric_keys(["segm"]),
                                                                          0.0)


def test_shifted_box_known_iou(gt):
    """A 10x10 box shifted by 2.3 px has IoU 77/123 = 0.626: it matches at IoU thresholds
    0.50, 0.55, 0.60 only, so AP = 3/10 on a GT with just that object."""
    one = {**gt, "images": gt["images"][:1], "annotations": gt["annotations"][:1]}
    det = [{"image_id": 1, "category_id": 1, "bbox": [5 + 2.3, 5, 10, 10], "score": 0.9}]
    m = evaluate_coco(one, det, iou_types=("bbox",))
    assert m["bbox/AP50"] == pytest.approx(1.0)
    assert m["bbox/AP75"] == pytest.approx(0.0)
    assert m["bbox/AP"] == pytest.approx(0.3)
    assert m["bbox/APs"] == pytest.approx(0.3)
    assert m["bbox/APm"] == -1.0


def test_results_outside_gt_images_are_dropped_and_masks_alone_work(gt):
    res = _as_results(gt)
    for r in res:
        del r["bbox"]  # segmentation only: the box is derived from the mask
    res.append({"image_id": 999, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1.0,
                "segmentation": rle(_square(64, 64, 0, 0, 5, 5))})
    metrics = evaluate_coco(gt, res)
    assert metrics["segm/AP"] == pytest.approx(1.0)
    assert metrics["bbox/AP"] == pytest.approx(1.0)


def test_half_the_objects_found(gt):
    """Only the medium square found, with score 1: recall 1/3 of the small+medium GT ->
    AP (all areas) = 101-point precision mean over recall up to 1/3."""
    res = [r for r in _as_results(gt) if r["bbox"][2] == 40]
    m = evaluate_coco(gt, res, iou_types=("segm",))
    assert m["segm/APm"] == pytest.approx(1.0)
    assert m["segm/APs"] == pytest.approx(0.0)
    # precision 1 for recall thresholds 0, 0.01, ..., 0.33 (34 of 101 points), 0 after
    assert m["segm/AP"] == pytest.approx(34 / 101)


def test_bad_inputs(gt, tmp_path):
    box_only = copy.deepcopy(gt)
    for a in box_only["annotations"]:
        del a["segmentation"]
    with pytest.raises(DatasetError, match="annotation 1 has no segmentation"):
        evaluate_coco(box_only, _as_results(gt))
    assert evaluate_coco(box_only, _as_results(gt), iou_types=("bbox",))["bbox/AP"] == 1.0
    with pytest.raises(DatasetError, match="file not found"):
        evaluate_coco(tmp_path / "missing.json", [])
    with pytest.raises(DatasetError, match="categories"):
        evaluate_coco({"images": []}, [])
    with pytest.raises(DatasetError, match="lacks 'score'"):
        evaluate_coco(gt, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}])
    with pytest.raises(ValueError, match="iou_types"):
        evaluate_coco(gt, [], iou_types=("keypoints",))


def test_f1_threshold_is_the_best_cut_of_a_hand_counted_case():
    """4 ground-truth squares; detections by score: 0.9 hit, 0.8 miss, 0.7 hit, 0.6 hit,
    0.3 miss. F1 at each cut: 0.4, 0.33, 0.57, 0.75, 0.67 -> keep >= 0.6, F1 0.75."""
    specs = [(10 + 12 * i, 10) for i in range(4)]
    anns = [{"id": i + 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
             "bbox": [x, y, 10, 10], "area": 100,
             "segmentation": rle(_square(64, 64, x, y, x + 10, y + 10))}
            for i, (x, y) in enumerate(specs)]
    data = {"images": [{"id": 1, "file_name": "a.png", "height": 64, "width": 64}],
            "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}

    def det(score, box):
        x, y = box
        return {"image_id": 1, "category_id": 1, "score": score, "bbox": [x, y, 10, 10],
                "segmentation": rle(_square(64, 64, x, y, x + 10, y + 10))}

    results = [det(0.9, specs[0]), det(0.8, (40, 45)), det(0.7, specs[1]), det(0.6, specs[2]),
               det(0.3, (5, 45))]
    metrics = evaluate_coco(data, results, f1=True)
    for t in ("bbox", "segm"):
        assert metrics[f"{t}/F1_threshold"] == pytest.approx(0.6)
        assert metrics[f"{t}/F1"] == pytest.approx(0.75)
    # a tie is never split: with the last miss also at 0.6, keeping ">= 0.6" keeps both
    # (F1 2*3 / (5 + 4) = 0.67), which still beats stopping at 0.7 (0.57)
    results[4]["score"] = 0.6
    metrics = evaluate_coco(data, results, iou_types=("segm",), f1=True)
    assert metrics["segm/F1_threshold"] == pytest.approx(0.6)
    assert metrics["segm/F1"] == pytest.approx(2 / 3)
    assert evaluate_coco(data, [], iou_types=("segm",), f1=True)["segm/F1_threshold"] == 1.0
    # an image with an object and no detection (a weak model) counts its object, missed:
    # 5 ground truths, F1 at ">= 0.6" 2*3 / (5 + 5) = 0.6, at ">= 0.7" 2*2 / (3 + 5) = 0.5
    data["images"].append({"id": 2, "file_name": "b.png", "height": 64, "width": 64})
    data["annotations"].append({**anns[0], "id": 9, "image_id": 2})
    metrics = evaluate_coco(data, results, iou_types=("segm",), f1=True)
    assert metrics["segm/F1_threshold"] == pytest.approx(0.6)
    assert metrics["segm/F1"] == pytest.approx(0.6)
