"""``export_speed.py --ref``: the equality check of two versions' results and its table."""

from __future__ import annotations

import numpy as np

from benchmarks.export_speed import ref_lines, same_results
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
    assert same_results(first, _prediction(masks.copy(), [0.9, 0.5]))
    other = masks.copy()
    other[1, 3, 4] = True
    assert not same_results(first, _prediction(other, [0.9, 0.5]))
    assert not same_results(first, _prediction(masks, [0.9, 0.25]))
    assert not same_results(first, _prediction(masks[:1], [0.9]))


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
