"""Drawing: exact alpha blend inside masks, untouched pixels elsewhere, label images, palette."""

from __future__ import annotations

import numpy as np
import pytest

from serving import Prediction
from serving.formats.visualize import draw_predictions, masks_to_label_image, palette


def make_pred() -> tuple[np.ndarray, Prediction]:
    image = np.full((40, 50, 3), 93, np.uint8)
    image[:, :, 1] = 10
    masks = np.zeros((2, 40, 50), bool)
    masks[0, 5:15, 5:20] = True
    masks[1, 10:30, 15:40] = True  # overlaps mask 0 on rows 10..14, cols 15..19
    boxes = np.array([[5, 5, 20, 15], [15, 10, 40, 30]], np.float32)
    pred = Prediction(boxes, np.array([0.9, 0.8], np.float32), np.array([0, 1], np.int64),
                      masks, ("a", "b"))
    return image, pred


def test_palette_is_deterministic_and_distinct():
    p = palette(5)
    assert p.shape == (5, 3) and p.dtype == np.uint8
    assert np.array_equal(p, palette(5)) and np.array_equal(palette(8)[:5], p)
    assert len({tuple(c) for c in p}) == 5
    assert p[0].tolist() == [255, 63, 63]  # hue 0, saturation 0.75, value 1


def test_draw_blends_inside_masks_only():
    image, pred = make_pred()
    out = draw_predictions(image, pred, alpha=0.3, show_boxes=False, show_labels=False)
    assert out.shape == image.shape and out.dtype == np.uint8
    colors = palette(2).astype(np.float64)
    # a pixel of mask 0 only: 0.7 * pixel + 0.3 * colour, rounded (93 -> 0.7*93 + 0.3*255)
    expected = np.rint(0.7 * image[6, 6].astype(np.float64) + 0.3 * colors[0])
    assert out[6, 6].tolist() == expected.tolist()
    assert out[6, 6, 0] == 142  # 65.1 + 76.5 = 141.6
    # an overlap pixel: blended with mask 0 then with mask 1
    step = 0.7 * image[12, 17].astype(np.float64) + 0.3 * colors[0]
    assert np.abs(out[12, 17] - (0.7 * step + 0.3 * colors[1])).max() <= 0.5 + 1e-6
    untouched = ~(pred.masks.any(axis=0))
    assert np.array_equal(out[untouched], image[untouched])
    assert image[6, 6].tolist() == [93, 10, 93]  # input not modified


def test_draw_with_boxes_and_labels_changes_only_near_boxes():
    image, pred = make_pred()
    out = draw_predictions(image, pred)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert not np.array_equal(out[5, 10], image[5, 10])  # box edge
    assert np.array_equal(out[38, 2], image[38, 2])  # far from masks, boxes and labels


def test_draw_empty_prediction_and_size_mismatch():
    image, pred = make_pred()
    empty = Prediction(np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                       np.zeros(0, np.int64), np.zeros((0, 40, 50), bool), ("a",))
    assert np.array_equal(draw_predictions(image, empty), image)
    with pytest.raises(ValueError, match="sizes differ"):
        draw_predictions(image[:20], pred)


def test_masks_to_label_image():
    _, pred = make_pred()
    labels = masks_to_label_image(pred)
    assert labels.shape == (40, 50) and labels.dtype == np.uint16
    assert labels[6, 6] == 1 and labels[12, 17] == 2 and labels[25, 35] == 2
    assert labels[0, 0] == 0
    assert set(np.unique(labels).tolist()) == {0, 1, 2}


def test_outlines_keep_small_masks_visible_and_text_scales_with_the_image():
    from serving.formats.visualize import text_size

    image = np.full((40, 50, 3), 93, np.uint8)
    masks = np.zeros((1, 40, 50), bool)
    masks[0, 20, 10:13] = True  # a 1x3 sliver: every pixel is outline, drawn in full colour
    pred = Prediction(np.array([[10, 20, 13, 21]], np.float32), np.array([0.5], np.float32),
                      np.array([0], np.int64), masks, ("a",))
    out = draw_predictions(image, pred, show_boxes=False, show_labels=False)
    assert (out[20, 10:13] == palette(1)[0]).all()
    assert np.array_equal(out[~masks[0]], image[~masks[0]])
    assert text_size(40, 50) == 10 and text_size(800, 1200) == 20 and text_size(9000, 9000) == 48


def test_labels_sit_above_the_box_or_below_it_at_the_top_edge():
    image = np.full((200, 200, 3), 0, np.uint8)
    masks = np.zeros((2, 200, 200), bool)
    masks[0, 100:120, 100:120] = True
    masks[1, 0:20, 10:30] = True
    pred = Prediction(np.array([[100, 100, 120, 120], [10, 0, 30, 20]], np.float32),
                      np.array([0.9, 0.8], np.float32), np.array([0, 0], np.int64), masks,
                      ("a",))
    out = draw_predictions(image, pred, show_boxes=False, alpha=0.0)
    assert out[85:99, 100:120].any()  # above the lower box
    assert out[21:35, 10:30].any()  # below the box at the top edge
    assert not out[121:140, 100:120].any()  # nothing below the lower box
