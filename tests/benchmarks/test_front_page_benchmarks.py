"""The helpers of the README picture and of the your-data walk-through, on hand-made data."""

from __future__ import annotations

import json

import numpy as np

from benchmarks.readme_picture import pick_images, upscale
from benchmarks.your_data import HAND_MASKED, mask_ap, split_validation


def _dataset() -> dict:
    """Image 1: three small boxes; image 2: one large; image 3: two large and one small."""
    boxes = {1: [[0, 0, 10, 10]] * 3, 2: [[0, 0, 30, 40]],
             3: [[0, 0, 24, 24], [5, 5, 50, 30], [1, 1, 23, 60]]}
    anns = [{"id": 10 * i + k, "image_id": i, "category_id": 1, "bbox": b}
            for i, bs in boxes.items() for k, b in enumerate(bs)]
    return {"images": [{"id": i, "file_name": f"{i}.png"} for i in boxes],
            "annotations": anns, "categories": [{"id": 1, "name": "x"}]}


def test_picture_picks_the_images_with_most_objects_a_reader_can_see():
    # large = both sides >= 24: image 3 has 2 (and 1 small), image 2 has 1, image 1 none
    assert [img["id"] for img in pick_images(_dataset(), 3)] == [3, 2, 1]
    assert [img["id"] for img in pick_images(_dataset(), 1, min_side=5)] == [1]  # 3 of 3


def test_upscale_keeps_boxes_on_their_pixels():
    image = np.zeros((20, 30, 3), np.uint8)
    image[5:10, 10:20] = 255
    boxes = np.array([[10, 5, 20, 10]], np.float32)
    big, big_boxes = upscale(image, boxes, 2)
    assert big.shape == (40, 60, 3)
    np.testing.assert_array_equal(big_boxes, [[20, 10, 40, 20]])
    assert big[14:16, 24:36].min() == 255 and big[:8].max() == 0  # inside / far outside
    same, same_boxes = upscale(image, boxes, 1)
    assert same is image and same_boxes is boxes


def test_split_validation_keeps_masks_only_for_the_hand_masked_images(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png"} for i in range(HAND_MASKED + 2)]
    anns = [{"id": i, "image_id": i, "category_id": 1, "bbox": [0, 0, 4, 4], "area": 16,
             "segmentation": [[0, 0, 4, 0, 4, 4]]} for i in range(HAND_MASKED + 2)]
    val = tmp_path / "val.json"
    val.write_text(json.dumps({"images": images, "annotations": anns, "categories": []}))
    hand_path, boxes_path = split_validation(val, tmp_path)
    hand, boxes = json.loads(hand_path.read_text()), json.loads(boxes_path.read_text())
    assert [img["id"] for img in hand["images"]] == list(range(HAND_MASKED))
    assert all("segmentation" in a for a in hand["annotations"])
    assert len(boxes["annotations"]) == HAND_MASKED + 2
    assert not any("segmentation" in a or "area" in a for a in boxes["annotations"])


def test_mask_ap_reads_the_label_commands_line():
    text = "label: 3 annotations\nsegm/AP      58.8\nsegm/AP50    97.6\n"
    assert mask_ap(text) == 58.8
