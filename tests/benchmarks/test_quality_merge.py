"""Merging quality-benchmark results of several invocations, and the paired per-seed
differences against BoxInst: known values, and a one-line error for each mismatch."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from benchmarks.quality import ROWS, markdown, paired_differences
from benchmarks.quality_merge import MergeError, main, merge


def _run(row: str, seed: int, ap: float, overrides: list[str] | None = None,
         dataset: str = "synthetic") -> dict:
    metrics = {k: ap for k in ("segm/AP", "segm/AP50", "segm/AP75", "segm/APs", "segm/APm",
                               "segm/APl")}
    metrics["bbox/AP"] = ap + 10
    extra = ROWS[row][1] if overrides is None else overrides
    return {"dataset": dataset, "row": row, "seed": seed, "metrics": metrics, "seconds": 60.0,
            "overrides": extra + [f"seed={seed}", f"output_dir=/runs/{row}/s{seed}"],
            "separability": None}


def _write(path: Path, runs: list[dict], iters: int = 600, quick: bool = False) -> Path:
    seeds = sorted({r["seed"] for r in runs})
    data = {"quick": quick, "workers": 2, "command": "python benchmarks/quality.py",
            "machine": "test", "total_seconds": 60.0 * len(runs),
            "datasets": {"synthetic": {"iters": iters, "seeds": seeds, "rows": {},
                                       "figure": None,
                                       "untrained": {"segm/AP": 0.0, "segm/AP50": 0.0,
                                                     "segm/AP75": 0.0, "bbox/AP": 0.0}}},
            "runs": runs}
    path.write_text(json.dumps(data))
    return path


def test_paired_differences_over_shared_seeds_only() -> None:
    base = [_run("boxinst", 0, 16.0), _run("boxinst", 1, 15.0), _run("boxinst", 2, 18.0)]
    sim = [_run("sim", 0, 17.0), _run("sim", 2, 17.5), _run("sim", 5, 30.0)]  # 5: no base
    d = paired_differences(sim, base)
    assert d["seeds"] == [0, 2] and d["diffs"] == pytest.approx([1.0, -0.5])
    assert d["mean"] == pytest.approx(0.25)
    assert d["std"] == pytest.approx(math.sqrt(((0.75) ** 2 + (0.75) ** 2) / 1))
    assert paired_differences([_run("sim", 9, 1.0)], base) is None


def test_merge_pools_seeds_and_recomputes_mean_spread_and_pairs(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.json", [_run("boxinst", 0, 16.0), _run("boxinst", 1, 14.0),
                                     _run("sim", 0, 17.0), _run("sim", 1, 15.0),
                                     _run("mask", 0, 24.0)])
    b = _write(tmp_path / "b.json", [_run("boxinst", 2, 18.0), _run("sim", 2, 17.0)])
    merged = merge([a, b])
    info = merged["datasets"]["synthetic"]
    assert info["seeds"] == [0, 1, 2]
    box = info["rows"][ROWS["boxinst"][0]]
    assert box["n"] == 3 and box["segm/AP"] == pytest.approx(16.0)
    assert box["segm/AP_std"] == pytest.approx(2.0)  # sample std of (16, 14, 18)
    pair = info["paired"][ROWS["sim"][0]]
    assert pair["seeds"] == [0, 1, 2] and pair["diffs"] == pytest.approx([1.0, 1.0, -1.0])
    assert merged["total_seconds"] == pytest.approx(7 * 60.0)
    text = markdown({**merged, "command": "merge", "merged_from": [str(a), str(b)]})
    assert "## synthetic (600 iterations, seeds [0, 1, 2])" in text
    assert f"- {ROWS['sim'][0]}: +0.3 ± 1.2 over 3 seed(s) (0: +1.0, 1: +1.0, 2: -1.0)" in text
    assert "the sum over the merged files" in text


def test_merge_ignores_how_the_schedule_was_spelled(tmp_path: Path) -> None:
    """--iters 600 adds optim.max_iter/steps overrides; with equal iterations that merges."""
    a = _write(tmp_path / "a.json", [_run("sim", 0, 17.0)])
    b = _write(tmp_path / "b.json", [_run("sim", 1, 16.0, ["optim.max_iter=600",
                                                           "optim.steps=[510]"])])
    assert merge([a, b])["datasets"]["synthetic"]["rows"][ROWS["sim"][0]]["n"] == 2


@pytest.mark.parametrize("case, message", [
    ("iters", "synthetic ran 1200 iterations, another file 600"),
    ("quick", "--quick=True but"),
    ("settings", "row sim of synthetic ran with ['sim.tau=0.1']"),
    ("duplicate", "seed 0 of row sim (synthetic) is also in"),
])
def test_merge_refuses_runs_of_different_settings(tmp_path: Path, case: str,
                                                  message: str) -> None:
    a = _write(tmp_path / "a.json", [_run("sim", 0, 17.0)])
    second = {"iters": dict(runs=[_run("sim", 1, 16.0)], iters=1200),
              "quick": dict(runs=[_run("sim", 1, 16.0)], quick=True),
              "settings": dict(runs=[_run("sim", 1, 16.0, ["sim.tau=0.1"])]),
              "duplicate": dict(runs=[_run("sim", 0, 16.0)])}[case]
    b = _write(tmp_path / "b.json", **second)
    with pytest.raises(MergeError, match=re.escape(message)):
        merge([a, b])


def test_cli_errors_name_the_file_and_write_nothing(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    a = _write(tmp_path / "a.json", [_run("sim", 0, 17.0)])
    md = tmp_path / "a.md"
    md.write_text("# Quality benchmark\n")
    out = tmp_path / "out"
    cases = [([str(a), str(md)], "a.md: not JSON"),
             ([str(a), str(tmp_path / "missing.json")], "missing.json: no such file"),
             ([str(a), str(a)], "seed 0 of row sim"),
             ([str(a)], "at least two result files")]
    (tmp_path / "other.json").write_text(json.dumps({"rows": []}))
    cases.append(([str(a), str(tmp_path / "other.json")], "not a quality benchmark result"))
    for args, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(args + ["--name", "m", "--out-dir", str(out)])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_writes_json_and_markdown(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.json", [_run("boxinst", 0, 16.0), _run("sim", 0, 17.0)])
    b = _write(tmp_path / "b.json", [_run("boxinst", 1, 15.0), _run("sim", 1, 17.0)])
    out = tmp_path / "out"
    assert main([str(a), str(b), "--name", "m", "--out-dir", str(out)]) == 0
    data = json.loads((out / "m.json").read_text())
    assert data["merged_from"] == [str(a), str(b)]
    assert data["datasets"]["synthetic"]["paired"][ROWS["sim"][0]]["mean"] == pytest.approx(1.5)
    assert "| boxinst | 2 | 15.5 ± 0.7 |" in (out / "m.md").read_text()


def test_sim_overrides_of_a_row_without_sim_do_not_block_the_merge(tmp_path: Path) -> None:
    """A --set sim.x given to a whole invocation reaches its BoxInst row, where it is inert."""
    a = _write(tmp_path / "a.json", [_run("boxinst", 0, 16.0)])
    b = _write(tmp_path / "b.json", [_run("boxinst", 1, 14.0, ROWS["boxinst"][1]
                                          + ["sim.tau_high_range=[1.01,1.01]"])])
    assert merge([a, b])["datasets"]["synthetic"]["rows"][ROWS["boxinst"][0]]["n"] == 2
    c = _write(tmp_path / "c.json", [_run("boxinst", 2, 15.0, ROWS["boxinst"][1]
                                          + ["model.fpn_channels=32"])])
    with pytest.raises(MergeError, match=re.escape("row boxinst of synthetic ran with")):
        merge([a, c])  # a setting outside sim.* still counts


def test_rows_keeps_only_the_named_rows(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.json", [_run("boxinst", 0, 16.0), _run("pseudo", 0, 15.0)])
    b = _write(tmp_path / "b.json", [_run("boxinst", 1, 14.0),  # pseudo: another setting
                                     _run("pseudo", 1, 19.0, ["sim.tau_high_range=[1,1]"])])
    with pytest.raises(MergeError, match="row pseudo of synthetic ran with"):
        merge([a, b])
    info = merge([a, b], rows=["boxinst"])["datasets"]["synthetic"]
    assert list(info["rows"]) == [ROWS["boxinst"][0]] and info["seeds"] == [0, 1]
    assert info["rows"][ROWS["boxinst"][0]]["segm/AP"] == pytest.approx(15.0)
    with pytest.raises(MergeError, match=re.escape("--rows sim: in none of the files (their "
                                                   "rows: boxinst pseudo)")):
        merge([a, b], rows=["boxinst", "sim"])


def test_rows_drops_a_dataset_left_without_runs(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.json", [_run("boxinst", 0, 16.0)])
    b = _write(tmp_path / "b.json", [_run("sim", 0, 40.0, dataset="nuclei")])
    data = json.loads(b.read_text())
    data["datasets"]["nuclei"] = data["datasets"].pop("synthetic")
    b.write_text(json.dumps(data))
    assert list(merge([a, b], rows=["boxinst"])["datasets"]) == ["synthetic"]
    assert list(merge([a, b])["datasets"]) == ["synthetic", "nuclei"]


def _two_datasets(path: Path, synthetic_iters: int, nuclei_seed: int) -> Path:
    """A file with a synthetic BoxInst run (at ``synthetic_iters``) and a nuclei SIM run."""
    _write(path, [_run("boxinst", 0, 16.0), _run("sim", nuclei_seed, 40.0 + nuclei_seed,
                                                 dataset="nuclei")], iters=synthetic_iters)
    data = json.loads(path.read_text())
    data["datasets"]["nuclei"] = {**data["datasets"]["synthetic"], "iters": 300}
    path.write_text(json.dumps(data))
    return path


def test_datasets_keeps_only_the_named_datasets(tmp_path: Path) -> None:
    """Only the kept datasets' schedules must agree: 600 and 2400 synthetic iterations do not
    block a merge of the nuclei runs."""
    a = _two_datasets(tmp_path / "a.json", 600, 0)
    b = _two_datasets(tmp_path / "b.json", 2400, 1)
    with pytest.raises(MergeError, match="synthetic ran 2400 iterations"):
        merge([a, b])
    merged = merge([a, b], datasets=["nuclei"])
    assert list(merged["datasets"]) == ["nuclei"]
    assert {(r["dataset"], r["seed"]) for r in merged["runs"]} == {("nuclei", 0), ("nuclei", 1)}
    assert merged["datasets"]["nuclei"]["rows"][ROWS["sim"][0]]["segm/AP"] == pytest.approx(40.5)
    with pytest.raises(MergeError, match=re.escape("--datasets voc: in none of the files "
                                                   "(their datasets: nuclei synthetic)")):
        merge([a, b], datasets=["nuclei", "voc"])


def test_cli_datasets_is_in_the_recorded_command(tmp_path: Path) -> None:
    a = _two_datasets(tmp_path / "a.json", 600, 0)
    b = _two_datasets(tmp_path / "b.json", 600, 1)
    out = tmp_path / "out"
    assert main([str(a), str(b), "--datasets", "nuclei", "--name", "m",
                 "--out-dir", str(out)]) == 0
    data = json.loads((out / "m.json").read_text())
    assert data["command"].endswith(" --datasets nuclei --name m")
    assert "## synthetic" not in (out / "m.md").read_text()


def test_cli_rows_is_in_the_recorded_command(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.json", [_run("boxinst", 0, 16.0), _run("sim", 0, 17.0)])
    b = _write(tmp_path / "b.json", [_run("boxinst", 1, 15.0), _run("sim", 1, 17.0)])
    out = tmp_path / "out"
    assert main([str(a), str(b), "--rows", "sim", "--name", "m", "--out-dir", str(out)]) == 0
    data = json.loads((out / "m.json").read_text())
    assert data["command"].endswith(" --rows sim --name m")
    assert {r["row"] for r in data["runs"]} == {"sim"}


def test_rows_of_one_file(tmp_path: Path) -> None:
    """FILE.json:ROW,ROW takes only those rows of that file; the others keep all theirs."""
    a = _write(tmp_path / "a.json", [_run("boxinst", 0, 16.0), _run("pseudo", 0, 15.0)])
    b = _write(tmp_path / "b.json", [_run("boxinst", 1, 14.0),
                                     _run("pseudo", 1, 19.0, ["sim.tau_high_range=[1,1]"])])
    info = merge([a, f"{b}:boxinst"])["datasets"]["synthetic"]
    assert info["rows"][ROWS["boxinst"][0]]["n"] == 2
    assert info["rows"][ROWS["pseudo"][0]]["n"] == 1
    assert info["rows"][ROWS["pseudo"][0]]["segm/AP"] == pytest.approx(15.0)
    with pytest.raises(MergeError, match=re.escape(f"{b}:boxinst,sim: no row sim in {b} (its "
                                                   "rows: boxinst pseudo)")):
        merge([a, f"{b}:boxinst,sim"])


def test_total_time_names_the_workers_only_when_the_files_agree(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.json", [_run("boxinst", 0, 16.0)])
    b = _write(tmp_path / "b.json", [_run("boxinst", 1, 15.0)])
    merged = merge([a, b])
    text = markdown({**merged, "command": "merge", "merged_from": [str(a), str(b)]})
    assert "Total time: 2.0 min with 2 worker processes of one thread each (the sum" in text
    data = json.loads(b.read_text())
    b.write_text(json.dumps({**data, "workers": 3}))
    merged = merge([a, b])
    text = markdown({**merged, "command": "merge", "merged_from": [str(a), str(b)]})
    assert "Total time: 2.0 min with a different number of worker processes per file of one " \
           "thread each (the sum" in text


def test_figure_comes_from_a_file_whose_runs_are_kept(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.json", [_run("boxinst", 0, 16.0)])
    b = _write(tmp_path / "b.json", [_run("boxinst", 1, 15.0), _run("sim", 1, 17.0),
                                     _run("pseudo", 1, 16.0)])
    data = json.loads(b.read_text())
    data["datasets"]["synthetic"]["figure"] = "sim_maps_b.png"  # quality.py: the "sim" row's
    b.write_text(json.dumps(data))
    assert merge([a, b])["datasets"]["synthetic"]["figure"] == "sim_maps_b.png"
    assert merge([a, f"{b}:boxinst"])["datasets"]["synthetic"]["figure"] is None
    assert merge([a, f"{b}:boxinst,pseudo"])["datasets"]["synthetic"]["figure"] is None
