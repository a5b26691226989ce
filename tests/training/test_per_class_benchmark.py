"""Per-class mask AP of the per-class benchmark, against hand-made detections."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from benchmarks.per_class import per_class_ap


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return rle


def test_per_class_ap_perfect_missing_and_half() -> None:
    masks = []
    for x in (0, 20, 40):
        m = np.zeros((64, 64), bool)
        m[10:30, x:x + 15] = True
        masks.append(m)
    coco = COCO()
    coco.dataset = {
        "images": [{"id": 1, "height": 64, "width": 64}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}],
        "annotations": [{"id": i + 1, "image_id": 1, "category_id": c, "iscrowd": 0,
                         "area": int(m.sum()), "bbox": list(mask_utils.toBbox(_rle(m))),
                         "segmentation": _rle(m)}
                        for i, (c, m) in enumerate(zip((1, 2, 3), masks))]}
    coco.createIndex()
    shifted = np.zeros((64, 64), bool)
    shifted[10:30, 40 + 7:40 + 15 + 7] = True  # IoU with the truth 8/22 = 0.36 < 0.5
    results = [{"image_id": 1, "category_id": 1, "segmentation": _rle(masks[0]), "score": 0.9},
               {"image_id": 1, "category_id": 3, "segmentation": _rle(shifted), "score": 0.9}]
    ap = per_class_ap(coco, results)
    assert ap[1] == pytest.approx(100.0)  # exact mask
    assert ap[2] == 0.0  # nothing detected
    assert ap[3] == 0.0  # detected, but below every IoU threshold
