"""The INT8 verification's matching and figures on hand-made predictions (known answers)."""

from __future__ import annotations

import numpy as np
import pytest

from export.verify_int8 import Int8Report, Int8Tolerances, compare_int8, match_confident
from serving.prediction import Prediction


def _pred(boxes, scores, labels, size=(100, 100)) -> Prediction:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    masks = np.zeros((len(boxes), *size), bool)
    for i, (x1, y1, x2, y2) in enumerate(boxes.astype(int)):
        masks[i, y1:y2, x1:x2] = True
    return Prediction(boxes, np.asarray(scores, np.float32), np.asarray(labels, np.int64),
                      masks, ("a", "b"))


def test_matching_needs_class_iou_and_a_confident_side():
    ref = _pred([[0, 0, 40, 40], [50, 50, 90, 90], [0, 50, 20, 70], [60, 0, 80, 20]],
                [0.9, 0.8, 0.2, 0.7], [0, 0, 1, 1])
    got = _pred([[0, 0, 40, 44], [50, 50, 90, 90], [0, 50, 20, 70], [10, 10, 30, 30]],
                [0.85, 0.1, 0.1, 0.9], [0, 1, 1, 1])
    # 0<->0: same class, IoU 40*40/(40*44) = 0.909; 1<->1: other class; 2<->2: both below 0.3;
    # ref 3 vs got 3: same class but no overlap.
    assert match_confident(ref, got, score=0.3) == [(0, 0)]
    row = compare_int8("x", ref, got, score=0.3)
    assert (row.torch_confident, row.export_confident) == (3, 2)
    assert (row.matched_torch, row.matched_export) == (1, 1)
    assert row.box_errors_px == [4.0] and row.box_errors == [pytest.approx(0.1)]
    assert row.mask_ious == [pytest.approx(40 * 40 / (40 * 44))]
    report = Int8Report([row], Int8Tolerances())
    assert report.agreement == pytest.approx(2 / 5)
    assert not report.passed and "detection agreement" in report.table()


def test_identical_predictions_pass_and_empty_ones_agree():
    ref = _pred([[0, 0, 40, 40], [50, 50, 90, 90]], [0.9, 0.6], [0, 1])
    row = compare_int8("same", ref, ref, score=0.3)
    row.prompt_ious = [1.0]
    report = Int8Report([row])
    assert report.agreement == 1.0 and report.box_error == 0.0 and report.mask_iou == 1.0
    assert report.passed
    empty = _pred(np.zeros((0, 4)), [], [])
    assert match_confident(empty, ref, 0.3) == []
    assert Int8Report([compare_int8("none", empty, empty, 0.3)]).agreement == 1.0
    assert not Int8Report().passed  # no images: nothing verified
