"""The quality benchmark's bookkeeping: per-row mean and spread over seeds, the Markdown table
(ratio to the fully supervised row, the untrained row), and the row definitions."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks.quality import (
    BACKGROUNDS,
    DATASETS,
    DEFAULT_DATASETS,
    FULL_ROWS,
    INVESTIGATION_ROWS,
    QUICK_ITERS,
    QUICK_ROWS,
    ROW_CONTEXTS,
    ROWS,
    dataset_config,
    main,
    markdown,
    select_rows,
    summarise,
)
from training.train_config import load_config

BENCH_SYNTHETIC = Path(__file__).resolve().parents[2] / "configs" / "bench_synthetic.yaml"


def _run(seed: int, ap: float, box: float) -> dict:
    metrics = {k: ap for k in ("segm/AP", "segm/AP50", "segm/AP75", "segm/APs", "segm/APm",
                               "segm/APl")}
    metrics["bbox/AP"] = box
    return {"seed": seed, "metrics": metrics, "seconds": 10.0}


def test_summarise_mean_and_sample_std() -> None:
    s = summarise([_run(0, 10.0, 30.0), _run(1, 14.0, 34.0)])
    assert s["n"] == 2 and s["seconds"] == 20.0
    assert s["segm/AP"] == pytest.approx(12.0)
    assert s["segm/AP_std"] == pytest.approx(math.sqrt(8.0))  # sample std of (10, 14)
    assert s["bbox/AP_runs"] == [30.0, 34.0]
    one = summarise([_run(0, 7.0, 9.0)])
    assert one["segm/AP_std"] == 0.0


def test_markdown_table_ratios_and_untrained_row() -> None:
    sim_runs = [_run(0, 16.0, 37.0), _run(1, 18.0, 37.0), _run(2, 17.0, 37.0)]
    sim_runs[0]["separability"] = {"instances": 10, "prototypes": 0.6, "oracle_class": 0.7,
                                   "oracle_instance": 0.8}
    sim_runs[1]["separability"] = {"instances": 12, "prototypes": 0.7, "oracle_class": 0.7,
                                   "oracle_instance": 0.9}
    sim_runs[2]["separability"] = None  # not measured: left out of the mean
    sim_runs[0]["pseudo_labels"] = {"fg_precision": 0.7, "background_fg": 0.4}
    sim_runs[1]["pseudo_labels"] = {"fg_precision": 0.8, "background_fg": 0.3}
    rows = {ROWS["mask"][0]: summarise([_run(0, 20.0, 40.0)]),
            ROWS["boxinst"][0]: summarise([_run(0, 15.0, 38.0), _run(1, 17.0, 36.0)]),
            ROWS["sim"][0]: summarise(sim_runs)}
    assert rows[ROWS["sim"][0]]["separability"] == pytest.approx(
        {"prototypes": 0.65, "oracle_class": 0.7, "oracle_instance": 0.85})
    assert "separability" not in rows[ROWS["boxinst"][0]]
    assert rows[ROWS["sim"][0]]["pseudo_labels"] == pytest.approx(
        {"fg_precision": 0.75, "background_fg": 0.35})
    assert "pseudo_labels" not in rows[ROWS["boxinst"][0]]
    results = {"quick": False, "command": "python benchmarks/quality.py", "machine": "test",
               "total_seconds": 120.0, "workers": 2,
               "datasets": {"synthetic": {"iters": 600, "seeds": [0, 1], "rows": rows,
                                          "figure": "benchmarks/results/x.png",
                                          "untrained": {"segm/AP": 0.0, "segm/AP50": 0.0,
                                                        "segm/AP75": 0.0, "bbox/AP": 0.1}}}}
    text = markdown(results)
    lines = text.splitlines()
    box_row = next(line for line in lines if line.startswith("| boxinst |"))
    cells = [c.strip() for c in box_row.strip("|").split("|")]
    assert cells[1] == "2" and cells[2] == "16.0 ± 1.4" and cells[-3:] == ["0.80", "", ""]
    full_row = next(line for line in lines if line.startswith("| mask (fully supervised) |"))
    assert full_row.rstrip().endswith("| 1.00 |  |  |")
    sim_row = next(line for line in lines if line.startswith("| sim (alpha 0.5"))
    assert sim_row.rstrip().endswith("| 0.85 | 0.65 | 75% |")
    assert 'Background labelled foreground: "sim (alpha 0.5, + copy-paste)" 35%.' in text
    assert "prototypes 0.65, an oracle prototype per class (mean object feature of the class) " \
           "0.70, an oracle prototype per instance 0.85." in text
    assert any(line.startswith("| untrained | - | 0.0 |") for line in lines)
    assert "## synthetic (600 iterations, seeds [0, 1])" in text
    assert "2.0 min with 2 worker processes" in text


@pytest.mark.parametrize("key", list(ROWS))
def test_every_row_is_a_valid_config(key: str) -> None:
    name, overrides = ROWS[key]
    cfg = load_config(BENCH_SYNTHETIC, overrides)
    if key == "mask":
        assert cfg.supervision == "mask" and not cfg.sim.enabled
    elif key == "boxinst":
        assert cfg.supervision == "box" and not cfg.sim.enabled
    else:
        assert cfg.sim.enabled and cfg.sim.pseudo_loss == (key != "pasteonly")
        assert cfg.sim.copy_paste == (key not in ("pseudo", "pseudobg", "oraclems"))
        assert (key in ROW_CONTEXTS) == (key == "oraclems")  # trained in oracle_semantic_map()
        assert cfg.sim.pseudo_foreground == (key not in ("pseudobg", "simbg", "simbg_alpha0",
                                                         "simbg_alpha1"))
        assert cfg.sim.alpha == {"alpha0": 0.0, "alpha1": 1.0, "simbg_alpha0": 0.0,
                                 "simbg_alpha1": 1.0}.get(key, 0.5)
        assert cfg.sim.num_prototypes == {"protos1": 1, "protos50": 50}.get(key, 10)
    assert set(QUICK_ROWS["synthetic"]) <= set(FULL_ROWS["synthetic"]) == set(ROWS)


def test_datasets_resolve_to_their_own_data() -> None:
    """Each dataset's config points at its own files; the diagnostic variant differs from the
    default synthetic data only by its folder and background, and is not in the default run."""
    configs = {name: dataset_config(name) for name in DATASETS}
    folders = {name: Path(cfg.data.train_json).parent for name, cfg in configs.items()}
    assert len(set(folders.values())) == len(DATASETS)
    for name, cfg in configs.items():
        assert Path(cfg.data.val_json).parent == folders[name]
        assert set(QUICK_ROWS[name]) <= set(FULL_ROWS[name]) and name in QUICK_ITERS
    default, variant = configs["synthetic"], configs["synthetic_distinct"]
    assert BACKGROUNDS == {"synthetic_distinct": "distinct"}  # generated by prepare_dataset
    assert (variant.model, variant.optim, variant.sim) == (default.model, default.optim,
                                                           default.sim)
    assert "synthetic_distinct" not in DEFAULT_DATASETS
    assert dataset_config("synthetic_distinct", ["optim.max_iter=7"]).optim.max_iter == 7


def test_bad_set_override_fails_before_any_work(tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--datasets", "synthetic_distinct", "--set", "model.mask_branch_conv=4",
              "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "unknown config key 'model.mask_branch_conv'" in err
    assert not any(tmp_path.iterdir())


def test_diagnostic_rows_run_only_when_named() -> None:
    assert "oraclems" not in select_rows("synthetic", quick=False, requested=None)
    for row in INVESTIGATION_ROWS:  # only when named
        assert row not in select_rows("synthetic", quick=False, requested=None)
    assert select_rows("synthetic", quick=False, requested=["pairfeat"]) == ["pairfeat"]
    assert "oraclems" not in select_rows("synthetic", quick=True, requested=None)
    assert select_rows("synthetic", quick=False, requested=["pseudo", "oraclems"]) == \
        ["pseudo", "oraclems"]
    assert select_rows("nuclei", quick=False, requested=["sim", "alpha0"]) == ["sim"]


def test_rows_a_dataset_lacks_fail_before_any_work(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--datasets", "nuclei", "--rows", "alpha0", "pasteonly", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "--rows alpha0 pasteonly: none of them runs on 'nuclei' (its rows: mask boxinst " \
           "sim simbg)" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(("preset", "row"), [("sim", "sim"), ("sim_bg", "simbg_alpha0"),
                                             ("boxinst", "boxinst"), ("mask", "mask")])
def test_training_presets_are_rows_of_the_table(preset: str, row: str) -> None:
    """The presets of ``python -m training --preset`` train what the table's rows measure."""
    assert load_config(BENCH_SYNTHETIC, preset=preset) == load_config(BENCH_SYNTHETIC,
                                                                      ROWS[row][1])
