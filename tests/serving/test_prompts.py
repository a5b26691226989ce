"""The Segmenter's request rules (:mod:`serving.prompts`): one check of a prompt, boxes split
into passes with the results of one pass, and the named threshold choice."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from sim_testing import TINY_CLASSES, record_box_widths

from serving import BoxError, InputError, Segmenter
from serving.prompts import (
    ALL,
    CALIBRATED,
    Prompt,
    PromptLimitError,
    parse_threshold,
    passes,
    threshold_value,
)

SIZE = (120, 160)  # (H, W) of sample_image
FIVE = np.array([[10, 10, 60, 50], [30, 20, 80, 60], [90, 50, 150, 110], [5, 5, 40, 40],
                 [100, 10, 150, 60]], np.float32)


@pytest.fixture(scope="module")
def seg(varied_checkpoint):
    return Segmenter.from_checkpoint(varied_checkpoint, device="cpu")


# --------------------------------------------------------------------------- check_prompt
def test_check_prompt_clips_boxes_and_resolves_labels(seg):
    prompt = seg.check_prompt([[-20, 10, 60, 500], [5, 5, 25, 30]], [TINY_CLASSES[2], None],
                              SIZE)
    assert isinstance(prompt, Prompt) and len(prompt) == 2 and prompt.image_size == SIZE
    assert prompt.boxes.dtype == np.float32 and prompt.labels.dtype == np.int64
    assert prompt.boxes.tolist() == [[0, 10, 60, 120], [5, 5, 25, 30]]
    assert prompt.labels.tolist() == [2, -1]
    assert prompt.mask_pixels == 60 * 110 + 20 * 25  # box areas summed (clipped to boxes)
    assert seg.check_prompt([1, 2, 11, 12], None, SIZE).boxes.tolist() == [[1, 2, 11, 12]]
    assert len(seg.check_prompt([], None, SIZE)) == 0


@pytest.mark.parametrize("boxes, labels, error, words", [
    ([[10, 10, 50, 50], [60, 60, 40, 80]], None, BoxError, "box 1: [60, 60, 40, 80] is reversed"),
    ([[np.nan, 1, 50, 50]], None, BoxError, "box 0: contains NaN"),
    ([[500, 500, 600, 600]], None, BoxError, "box 0: lies outside the 160x120 image"),
    ([[10, 10, 10.5, 50]], None, BoxError, "under one pixel across"),
    ([[10, 10, 50]], None, BoxError, "expected shape (M, 4)"),
    ([["a", 1, 2, 3]], None, BoxError, "not numeric"),
    ([[10, 10, 50, 50]], ["zebra"], InputError, "label 0: unknown class 'zebra'"),
    ([[10, 10, 50, 50]], [7], InputError, "label 0: class index 7 out of range 0..2"),
    ([[10, 10, 50, 50]], [1.5], InputError, "label 0: 1.5 is not a class index"),
    ([[10, 10, 50, 50]], [True], InputError, "label 0: True is not a class index"),
    ([[10, 10, 50, 50]], [0, 1], InputError, "labels: 2 given for 1 boxes"),
    ([[10, 10, 50, 50]], "disc", InputError, "labels: str given"),
])
def test_check_prompt_refuses_each_bad_input_in_one_line(seg, boxes, labels, error, words):
    with pytest.raises(error) as info:
        seg.check_prompt(boxes, labels, SIZE)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_check_prompt_limits_name_what_they_limit(seg):
    with pytest.raises(PromptLimitError, match="5 given, the limit is 4 per request") as info:
        seg.check_prompt(FIVE, None, SIZE, max_boxes=4)
    assert (info.value.what, info.value.value, info.value.limit) == ("max_boxes", 5, 4)
    area = int(sum((x2 - x1) * (y2 - y1) for x1, y1, x2, y2 in FIVE))
    assert seg.check_prompt(FIVE, None, SIZE, max_mask_pixels=area).mask_pixels == area
    with pytest.raises(PromptLimitError, match=f"cover {area} pixels") as info:
        seg.check_prompt(FIVE, None, SIZE, max_mask_pixels=area - 1)
    assert (info.value.what, info.value.value, info.value.boxes) == ("max_mask_pixels", area, 5)
    assert isinstance(info.value, BoxError)


def test_a_prompt_is_bound_to_its_image_and_holds_its_labels(seg, sample_image):
    prompt = seg.check_prompt(FIVE[:2], [0, 1], (60, 80))
    with pytest.raises(InputError, match="checked for a 80x60 image, given with a 160x120"):
        seg.predict(sample_image, boxes=prompt)
    with pytest.raises(InputError, match="labels: given with a checked Prompt"):
        seg.predict(sample_image, boxes=seg.check_prompt(FIVE, None, SIZE), labels=[0] * 5)


def test_predict_with_a_prompt_equals_predict_with_its_boxes(seg, sample_image):
    prompt = seg.check_prompt(FIVE, ["ring", 0, None, 2, -1], SIZE)
    a = seg.predict(sample_image, boxes=prompt)
    b = seg.predict(sample_image, boxes=FIVE, labels=["ring", 0, None, 2, -1])
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.masks, b.masks)
    np.testing.assert_array_equal(a.labels, b.labels)


# --------------------------------------------------------------------------- passes
def test_passes_cover_every_box_once_in_order():
    assert passes(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert passes(4, 2) == [slice(0, 2), slice(2, 4)]
    assert passes(3, 256) == [slice(0, 3)]
    assert passes(0, 2) == [slice(0, 0)]


@pytest.mark.parametrize("box_scale", [False, True])
def test_boxes_split_in_passes_give_the_results_of_one_pass(varied_checkpoint, sample_image,
                                                            box_scale):
    one = Segmenter.from_checkpoint(varied_checkpoint, device="cpu").with_box_scale(box_scale)
    split = Segmenter.from_checkpoint(varied_checkpoint, device="cpu",
                                      max_prompt_boxes=2).with_box_scale(box_scale)
    calls = record_box_widths(split)
    flipped = np.ascontiguousarray(sample_image[::-1])  # a second image with one box
    labels = [0, -1, 2, 1, -1]
    got = split.predict_batch([sample_image, flipped], boxes=[FIVE, FIVE[:1]],
                              labels=[labels, None])
    want = one.predict_batch([sample_image, flipped], boxes=[FIVE, FIVE[:1]],
                             labels=[labels, None])
    assert calls and max(calls) <= 2  # no backend call holds more than one pass's boxes
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g.boxes, w.boxes)
        np.testing.assert_array_equal(g.scores, w.scores)
        np.testing.assert_array_equal(g.labels, w.labels)
        np.testing.assert_array_equal(g.masks, w.masks)
    assert len(got[0]) == 5 and len(got[1]) == 1


# --------------------------------------------------------------------------- thresholds
def test_threshold_choices_by_name_and_number():
    assert threshold_value(CALIBRATED, 0.37) == 0.37
    assert threshold_value(ALL, 0.37) is None and threshold_value(None, 0.37) is None
    assert threshold_value(0, 0.37) is None and threshold_value(0.25, 0.37) == 0.25
    assert threshold_value(np.float32(0.5), 0.37) == 0.5
    for bad in (1.5, -0.1, float("nan"), "best", True, [0.3]):
        with pytest.raises(InputError, match="give 'calibrated'.*'all'.*a number in"):
            threshold_value(bad, 0.37)
    assert parse_threshold(" Calibrated ") == CALIBRATED and parse_threshold("all") == ALL
    assert parse_threshold("0.3") == 0.3
    with pytest.raises(argparse.ArgumentTypeError, match="'2': give calibrated, all or a number"):
        parse_threshold("2")


def test_score_threshold_calibrated_is_the_display_threshold(seg, sample_image):
    cut = seg.score_cut(CALIBRATED)
    assert cut == seg.display_threshold == seg.cfg.score_threshold  # no calibration stored
    everything = seg.predict(sample_image)
    assert len(everything) == len(seg.predict(sample_image, score_threshold=ALL))
    middle = float(np.median(everything.scores))
    kept = seg.predict(sample_image, score_threshold=middle)
    np.testing.assert_array_equal(kept.scores, everything.scores[everything.scores >= middle])
    with pytest.raises(InputError, match="score_threshold 'best'"):
        seg.predict(sample_image, score_threshold="best")
