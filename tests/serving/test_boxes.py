"""Prompt boxes and labels: clipping, every rejection with its index, and label parsing."""

from __future__ import annotations

import numpy as np
import pytest

from serving import BoxError, InputError, Segmenter
from serving.inference.boxes import validate_boxes

SIZE = (120, 160)  # (height, width)


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg, f"message is not one line: {msg!r}"
    return msg


def test_boxes_inside_are_unchanged_and_float32():
    out = validate_boxes([[10, 20, 30, 40], [0.5, 1.5, 159, 119]], SIZE, 10)
    assert out.dtype == np.float32 and out.shape == (2, 4)
    assert out.tolist() == [[10, 20, 30, 40], [0.5, 1.5, 159, 119]]


def test_boxes_outside_are_clipped():
    out = validate_boxes(np.array([[-10, -5, 50, 300], [100, 50, 400, 90]]), SIZE, 10)
    assert out.tolist() == [[0, 0, 50, 120], [100, 50, 160, 90]]


def test_single_box_as_flat_list():
    assert validate_boxes([1, 2, 3, 4], SIZE, 10).tolist() == [[1, 2, 3, 4]]


def test_empty_box_list():
    for empty in ([], np.zeros((0, 4))):
        out = validate_boxes(empty, SIZE, 10)
        assert out.shape == (0, 4) and out.dtype == np.float32


@pytest.mark.parametrize("boxes, phrase", [
    ([[0, 0, 10, 10], [5, 5, 20, 20], [30, 10, 20, 40]], "box 2"),  # reversed x
    ([[0, 0, 10, 10], [5, 40, 20, 30]], "box 1"),                    # reversed y
    ([[5, 5, 5, 20]], "box 0"),                                      # zero width
    ([[0, 0, 10, 10], [1, 2, 3, float("nan")]], "box 1"),            # NaN
    ([[0, 0, float("inf"), 10]], "box 0"),                           # inf
    ([[0, 0, 10, 10], [200, 10, 300, 50]], "box 1"),                 # entirely outside
    ([[-50, -50, -10, -10]], "box 0"),                               # entirely outside
])
def test_bad_boxes_name_their_index(boxes, phrase):
    with pytest.raises(BoxError) as exc:
        validate_boxes(boxes, SIZE, 10)
    msg = one_line(exc)
    assert msg.startswith(phrase + ":")


def test_reversed_and_nan_messages():
    with pytest.raises(BoxError, match="reversed or has zero area"):
        validate_boxes([[30, 10, 20, 40]], SIZE, 10)
    with pytest.raises(BoxError, match="NaN"):
        validate_boxes([[0, 0, 10, float("nan")]], SIZE, 10)
    with pytest.raises(BoxError, match="outside"):
        validate_boxes([[200, 10, 300, 50]], SIZE, 10)


def test_a_box_under_one_pixel_across_is_named_as_such_not_outside():
    with pytest.raises(BoxError, match=r"box 0: \[30, 40, 30.5, 60\] is 0.5 x 20 pixels, under "
                                       "one pixel across"):
        validate_boxes([[30, 40, 30.5, 60]], SIZE, 10)


def test_too_many_boxes():
    boxes = [[0, 0, 10, 10]] * 4
    assert validate_boxes(boxes, SIZE, 4).shape == (4, 4)
    with pytest.raises(BoxError) as exc:
        validate_boxes(boxes, SIZE, 3)
    assert "the limit is 3" in one_line(exc)


@pytest.mark.parametrize("boxes", [[[1, 2, 3]], [[[1, 2, 3, 4]]], [1, 2, 3], np.zeros((2, 5))])
def test_wrong_shape(boxes):
    with pytest.raises(BoxError) as exc:
        validate_boxes(boxes, SIZE, 10)
    assert "expected shape (M, 4)" in one_line(exc)


def test_not_numeric():
    with pytest.raises(BoxError) as exc:
        validate_boxes([["a", "b", "c", "d"]], SIZE, 10)
    assert "not numeric" in one_line(exc)
    with pytest.raises(BoxError):
        validate_boxes([[1, 2], [3, 4, 5, 6]], SIZE, 10)  # ragged


# ------------------------------------------------------------------ through the Segmenter
@pytest.fixture(scope="module")
def seg(tiny_checkpoint):
    return Segmenter.from_checkpoint(tiny_checkpoint, device="cpu")


def test_empty_box_list_returns_empty_prediction(seg, sample_image):
    pred = seg.predict(sample_image, boxes=[])
    assert len(pred) == 0
    assert pred.boxes.shape == (0, 4) and pred.scores.shape == (0,)
    assert pred.labels.shape == (0,) and pred.labels.dtype == np.int64
    assert pred.masks.shape == (0, 120, 160) and pred.masks.dtype == bool
    assert pred.to_coco(1) == []


def test_segmenter_rejects_bad_boxes(seg, sample_image):
    with pytest.raises(BoxError, match="box 1"):
        seg.predict(sample_image, boxes=[[10, 10, 50, 50], [60, 60, 40, 80]])
    with pytest.raises(BoxError, match="257 given, the limit is 256 per request"):
        seg.check_prompt([[10, 10, 50, 50]] * 257, None, (120, 160), max_boxes=256)
    with pytest.raises(BoxError, match="expected shape"):
        seg.predict(sample_image, boxes=[[10, 10, 50]])


def test_segmenter_clips_boxes(seg, sample_image):
    pred = seg.predict(sample_image, boxes=[[-20, 10, 60, 500]])
    assert pred.boxes.tolist() == [[0, 10, 60, 120]]


def test_label_errors(seg, sample_image):
    box = [[10, 10, 50, 50], [60, 60, 100, 100]]
    with pytest.raises(InputError) as exc:
        seg.predict(sample_image, boxes=box, labels=[0])
    assert "1 given for 2 boxes" in one_line(exc)
    with pytest.raises(InputError) as exc:
        seg.predict(sample_image, boxes=box, labels=["disc", "hexagon"])
    msg = one_line(exc)
    assert "label 1" in msg and "hexagon" in msg and "disc, ring, triangle" in msg
    with pytest.raises(InputError) as exc:
        seg.predict(sample_image, boxes=box, labels=[3, 0])
    assert "label 0" in one_line(exc) and "out of range 0..2" in str(exc.value)
    with pytest.raises(InputError, match="out of range"):
        seg.predict(sample_image, boxes=box, labels=[0, -2])


def test_batch_argument_errors(seg, sample_image):
    with pytest.raises(InputError, match="boxes: 2 entries for 1 images"):
        seg.predict_batch([sample_image], boxes=[None, None])
    with pytest.raises(InputError, match="batch_size=0"):
        seg.predict_batch([sample_image], batch_size=0)
