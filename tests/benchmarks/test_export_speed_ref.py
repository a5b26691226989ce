"""``export_speed.py --ref``: the equality check of two versions' results, their per-round
comparison and its table."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.common import identical_predictions
from benchmarks.export_speed import ref_comparison, ref_lines
from serving.prediction import Prediction


def _prediction(masks: np.ndarray, scores: list[float]) -> Prediction:
    n = len(scores)
    boxes = np.array([[1, 1, 4, 3], [0, 0, 2, 2]], np.float32)[:n]
    return Prediction(boxes, np.array(scores, np.float32), np.array([0, 1])[:n], masks,
                      ["a", "b"])


def test_same_results_needs_equal_boxes_scores_labels_and_every_mask_pixel() -> None:
    masks = np.zeros((2, 4, 5), bool)
    masks[0, 1:3, 1:4] = True
    first = _prediction(masks, [0.9, 0.5])
    assert identical_predictions(first, _prediction(masks.copy(), [0.9, 0.5]))
    other = masks.copy()
    other[1, 3, 4] = True
    assert not identical_predictions(first, _prediction(other, [0.9, 0.5]))
    assert not identical_predictions(first, _prediction(masks, [0.9, 0.25]))
    assert not identical_predictions(first, _prediction(masks[:1], [0.9]))


def test_ref_table_gives_ratios_and_outside_times_with_intervals() -> None:
    result = {"case": "light@256", "ref_same_results": True}
    for mode, (ratio, now, ref) in {"automatic": (0.9, 7.7, 9.3),
                                    "prompt(10)": (1.0, 25.0, 25.5)}.items():
        result.update({f"now_over_ref {mode}": ratio,
                       f"now_over_ref {mode} 95": (ratio - 0.05, ratio + 0.05),
                       f"outside_ms {mode}": [now, ref],
                       f"outside_ms_now_minus_ref {mode}": now - ref,
                       f"outside_ms_now_minus_ref {mode} 95": (now - ref - 1, now - ref + 1)})
    payload = {"ref": "abc", "ref_commit": "abcdef0123456789", "results": [result]}
    text = "\n".join(ref_lines(payload))
    assert "`serving` package of abc (abcdef0123)" in text
    assert ("| light@256 | 0.900 (0.850 to 0.950) | 1.000 (0.950 to 1.050) "
            "| 9.3 -> 7.7: -1.60 (-2.60 to -0.60) | 25.5 -> 25.0: -0.50 (-1.50 to 0.50) "
            "| yes |") in text
    result["ref_same_results"] = False
    assert "| **no** |" in "\n".join(ref_lines(payload))
    assert ref_lines({"results": []}) == []


def test_ref_comparison_pairs_rounds_and_skips_the_warm_up_call() -> None:
    """Per round: end to end today / ref, and the time outside the backend (end to end x
    (1 - 1 / (end to end / backend))); hand values over two rounds."""
    times, paired = {}, {}
    for label, t, ratios in (("onnxruntime int8", [1.0, 2.0], [9.0, 2.0, 4.0]),
                             ("ref", [2.0, 2.0], [9.0, 1.25, 1.25])):
        for mode in ("automatic", "prompt(10)"):
            times[f"{label} | {mode}"] = t
            paired[f"{label} {mode}"] = ratios  # the first: the warm-up call, not used
    out = ref_comparison(times, paired, "ref")
    assert out["now_over_ref automatic"] == pytest.approx(0.75)  # median of 0.5 and 1.0
    assert out["outside_ms automatic"] == pytest.approx([1000.0, 400.0])  # (500, 1500), 400
    assert out["outside_ms_now_minus_ref prompt(10)"] == pytest.approx(600.0)  # 100 and 1100
    low, high = out["outside_ms_now_minus_ref automatic 95"]
    assert 100 - 1e-6 <= low <= high <= 1100 + 1e-6
