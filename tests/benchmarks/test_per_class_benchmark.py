"""Per-class mask AP of the per-class benchmark, against hand-made detections."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from benchmarks.per_class import palette_separability, per_class_ap
from training.data.synthetic import BACKGROUND_PALETTE, PALETTE


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


@pytest.mark.parametrize(("object_colour", "background_colour", "expected"), [
    (PALETTE[0], BACKGROUND_PALETTE[3], 1.0),  # colour tells them apart
    (BACKGROUND_PALETTE[3], PALETTE[0], 0.0),  # ... the other way round
    (PALETTE[0], PALETTE[2], 0.5),  # both object colours (the default data): no information
])
def test_palette_separability_known_answers(tmp_path: Path, object_colour: np.ndarray,
                                            background_colour: np.ndarray,
                                            expected: float) -> None:
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[:] = background_colour
    disc = np.hypot(*np.mgrid[-32:32, -32:32]) <= 16
    rgb[disc] = object_colour
    Image.fromarray(rgb).save(tmp_path / "0.png")
    coco = COCO()
    coco.dataset = {
        "images": [{"id": 1, "height": 64, "width": 64, "file_name": "0.png"}],
        "categories": [{"id": 1, "name": "disc"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                         "area": int(disc.sum()), "bbox": [8, 8, 48, 48],
                         "segmentation": _rle(disc)}]}
    coco.createIndex()
    assert palette_separability(coco, tmp_path) == pytest.approx(expected)


@pytest.mark.slow
def test_evaluate_reports_the_checkpoint_iterations_and_every_class(tiny_run, tiny_data) -> None:
    """Run folders are reused by benchmark runs of other lengths: each row names its step."""
    from benchmarks.per_class import evaluate

    run = evaluate(tiny_run.result["checkpoint"], tiny_data.val_json, tiny_data.images, None)
    assert run["step"] == 6
    names = {c["name"] for c in COCO(str(tiny_data.val_json)).loadCats(
        COCO(str(tiny_data.val_json)).getCatIds())}
    assert set(run["classes"]) == names
    for cell in run["classes"].values():
        assert np.isnan(cell["mask_ap"]) or 0.0 <= cell["mask_ap"] <= 100.0
    assert 0.0 <= run["prompted_miou"] <= 1.0
