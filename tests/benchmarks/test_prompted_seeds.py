"""Box-prompted quality across seeds: Spearman's bootstrap interval, the seed table and the
mean IoU by crowding, on known values, and a one-line error for results that cannot be
merged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from benchmarks.prompted_quality import spearman_interval
from benchmarks.prompted_seeds import main, merge


def test_spearman_interval_holds_the_estimate_and_narrows_with_more_boxes() -> None:
    rng = np.random.default_rng(3)
    widths = []
    for n in (60, 600):
        score = rng.random(n)
        iou = score + rng.normal(0, 0.3, n)
        low, high = spearman_interval(score, iou, resamples=400)
        assert low < spearmanr(score, iou).statistic < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2  # ~ 1 / sqrt(n): 10x the boxes, about a third as wide
    assert spearman_interval(score, iou, resamples=400) == spearman_interval(
        score, iou, resamples=400)  # a fixed resampling seed


def test_spearman_interval_of_a_perfect_ranking_and_of_constant_scores() -> None:
    assert spearman_interval(np.arange(12.0), np.arange(12.0) ** 2, resamples=100) == (1.0, 1.0)
    assert spearman_interval(np.ones(8), np.arange(8.0)) is None


def _result(path: Path, model: str, default: dict, today: dict[int, float], **same) -> Path:
    rows = {"filled box": {"mask_ap": 10.0}, "today": {"mask_ap": 50.0},
            **{f"today @ {size}": {"mask_ap": ap} for size, ap in today.items()},
            "default": default}
    info = {"data": "nuclei", "split": "val", "images": 15, "boxes": 106, "upscale": 1,
            "model": model, "rows": rows, **same}
    path.write_text(json.dumps(info))
    return path


def _default(iou: float, under: float, ap: float, rho: float) -> dict:
    return {"mean_iou": iou, "under_0.5": under, "mask_ap": ap, "spearman": rho,
            "spearman_95": [rho - 0.1, rho + 0.1]}


def test_merge_takes_each_seeds_best_hand_picked_size_and_averages(tmp_path: Path) -> None:
    a = _result(tmp_path / "a.json", "s0", _default(0.80, 0.04, 65.0, 0.70), {320: 60.0, 192: 61.5})
    b = _result(tmp_path / "b.json", "s1", _default(0.82, 0.02, 66.0, 0.74), {320: 63.0})
    merged = merge([a, b])
    first, second = merged["rows"]
    assert (first["hand_picked"], first["ap_over_hand_picked"]) == ("today @ 192", 3.5)
    assert (second["hand_picked"], second["ap_over_hand_picked"]) == ("today @ 320", 3.0)
    s = merged["summary"]
    assert s["mean_iou"] == {"mean": 0.81, "std": pytest.approx(0.014, abs=1e-3)}
    assert s["under_0.5"]["mean"] == pytest.approx(0.03)
    assert s["ap_over_hand_picked"] == {"mean": 3.25, "std": pytest.approx(0.354, abs=1e-3)}
    assert s["spearman"]["mean"] == pytest.approx(0.72)


def test_main_writes_the_table(tmp_path: Path) -> None:
    a = _result(tmp_path / "a.json", "s0", _default(0.80, 0.04, 65.0, 0.70), {320: 60.0})
    b = _result(tmp_path / "b.json", "s1", _default(0.82, 0.02, 66.0, 0.74), {320: 63.0})
    assert main([str(a), str(b), "--name", "seeds", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "seeds.md").read_text()
    assert "| s0 | 0.8 | 4.0 % | 65 | today @ 320 (60.0) | 5 | 0.7 | 0.60-0.80 |" in text
    assert "| mean ± sd | 0.81 ± 0.014 | 3 % ± 1.4 % |" in text
    assert json.loads((tmp_path / "seeds.json").read_text())["boxes"] == 106


@pytest.mark.parametrize(("change", "message"), [
    ({"boxes": 305}, "boxes 305 differs from 106"),
    ({"split": "train"}, "split 'train' differs from 'val'"),
])
def test_results_of_other_boxes_are_refused_with_one_line(tmp_path: Path, capsys, change: dict,
                                                          message: str) -> None:
    a = _result(tmp_path / "a.json", "s0", _default(0.8, 0.04, 65.0, 0.7), {320: 60.0})
    b = _result(tmp_path / "b.json", "s1", _default(0.8, 0.04, 65.0, 0.7), {320: 60.0},
                **change)
    assert main([str(a), str(b), "--name", "x", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "b.json" in err and "\n" not in err
    assert not (tmp_path / "x.md").exists()


def test_a_result_without_a_hand_picked_size_names_the_flag(tmp_path: Path, capsys) -> None:
    a = _result(tmp_path / "a.json", "s0", _default(0.8, 0.04, 65.0, 0.7), {})
    b = _result(tmp_path / "b.json", "s1", _default(0.8, 0.04, 65.0, 0.7), {320: 60.0})
    assert main([str(a), str(b), "--name", "x", "--out", str(tmp_path)]) == 2
    assert "--sizes N" in capsys.readouterr().err
    assert main([str(a), "--name", "x", "--out", str(tmp_path)]) == 2
    assert "two or more" in capsys.readouterr().err


def test_compare_sets_another_rows_spearman_beside_the_default(tmp_path: Path,
                                                               capsys) -> None:
    paths = []
    for name, rho, other in (("s0", 0.70, 0.60), ("s1", 0.74, 0.64)):
        path = _result(tmp_path / f"{name}.json", name, _default(0.8, 0.04, 65.0, rho),
                       {320: 60.0})
        info = json.loads(path.read_text())
        info["rows"]["old score"] = {**info["rows"]["default"], "spearman": other}
        path.write_text(json.dumps(info))
        paths.append(str(path))
    merged = merge([Path(p) for p in paths], "old score")
    assert [r["compare_spearman"] for r in merged["rows"]] == [0.60, 0.64]
    assert merged["summary"]["compare_spearman"]["mean"] == pytest.approx(0.62)
    assert main([*paths, "--compare", "old score", "--name", "c", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "c.md").read_text()
    assert "| Spearman, old score | result file |" in text
    assert "| 0.7 | 0.60-0.80 | 0.6 | `s0.md` |" in text
    assert "| 0.72 ± 0.028 | - | 0.62 ± 0.028 | - |" in text
    assert main([*paths, "--compare", "nope", "--name", "d", "--out", str(tmp_path)]) == 2
    assert "no 'nope' row" in capsys.readouterr().err


def test_mean_iou_by_crowding_bins_on_known_values() -> None:
    from benchmarks.prompted_quality import crowding_bins, crowding_table

    iou = np.array([0.9, 0.8, 0.6, 0.5, 0.3, 0.2])
    crowded = np.array([0.0, 0.0, 0.1, 0.15, 0.5, 1.0])  # 0.1 falls in (0, 0.1]
    bins = crowding_bins(iou, crowded)
    assert bins == {"none": [2, 0.85], "0.0-0.1": [1, 0.6], "0.1-0.2": [1, 0.5],
                    "0.2-0.4": None, "0.4-1.0": [2, 0.25]}
    table = crowding_table({"default": {"by_crowding": bins}, "old": {}})
    assert "| boxes | 2 | 1 | 1 | 0 | 2 |" in table
    assert "| default | 0.85 | 0.6 | 0.5 | - | 0.25 |" in table and "old" not in table
