"""The pseudo-label diagnostic: hand-counted labels, calibration bins, and a trained tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.pseudo_labels import (
    CALIBRATION_EDGES,
    COUNTS,
    calibration_counts,
    count_labels,
    load_run,
    main,
    pseudo_label_quality,
    summarise,
)
from serving.errors import CheckpointError
from training.run_checkpoints import SIM_STATE, latest_checkpoint, read_tensor_state


def test_count_labels_by_hand() -> None:
    # One 5x5 box (whole grid); the object is the 2x2 block at rows 1-2, cols 1-2.
    gt = torch.zeros(1, 5, 5)
    gt[0, 1:3, 1:3] = 1
    box = torch.ones(1, 5, 5)
    target = torch.zeros(1, 5, 5)
    target[0, 1:3, 1:4] = 1  # foreground: the object plus the column to its right (2 px)
    weight = target.clone()
    weight[0, 4, :] = 1  # confident background: the bottom row (5 px, none of them object)
    weight[0, 1, 1] = 1
    target[0, 1, 1] = 0  # ... and one object pixel wrongly labelled background
    got = dict(zip(COUNTS, count_labels(target, weight, box, gt, torch.tensor([1]), 3)[1]
                   .tolist(), strict=True))
    # near = background pixels touching the object (8-neighbourhood): rows 0-3, cols 0-3 minus
    # the object = 12; of them labelled foreground: (1, 3) and (2, 3).
    assert got == {"object": 4, "object_fg": 3, "object_bg": 1, "background": 21,
                   "background_fg": 2, "background_bg": 5, "near": 12, "near_fg": 2}
    assert count_labels(target, weight, box, gt, torch.tensor([1]), 3)[[0, 2]].sum() == 0
    s = summarise(count_labels(target, weight, box, gt, torch.tensor([1]), 3).sum(0))
    assert s["fg_precision"] == pytest.approx(3 / 5)
    assert s["bg_precision"] == pytest.approx(5 / 6)
    assert s["object_fg"] == pytest.approx(3 / 4) and s["object_bg"] == pytest.approx(1 / 4)
    assert s["background_fg"] == pytest.approx(2 / 21)
    assert s["near_fg"] == pytest.approx(2 / 12) and s["far_fg"] == 0.0


def test_count_labels_ignores_pixels_outside_the_box() -> None:
    gt = torch.ones(1, 4, 4)
    target = torch.ones(1, 4, 4)
    box = torch.zeros(1, 4, 4)
    box[0, :2, :2] = 1
    got = count_labels(target, target, box, gt, torch.tensor([0]), 1)[0]
    assert got[COUNTS.index("object")] == 4 and got[COUNTS.index("object_fg")] == 4


def test_calibration_bins() -> None:
    edges = torch.tensor(CALIBRATION_EDGES, dtype=torch.float64)
    values = torch.tensor([0.0, 0.05, 0.1, 0.5, 0.949, 0.95, 0.995, 1.0])
    got = calibration_counts(values, edges).tolist()
    expected = [0.0] * (len(CALIBRATION_EDGES) - 1)
    for bin_index in (0, 0, 1, 5, 9, 10, 11, 11):  # 1.0 falls in the last, closed bin
        expected[bin_index] += 1
    assert got == expected


@pytest.mark.slow
def test_on_a_trained_run(tiny_run, tmp_path: Path) -> None:
    cfg, sim, step = load_run(tiny_run.out)
    assert step == 6
    saved = read_tensor_state(latest_checkpoint(tiny_run.out) / SIM_STATE)["prototypes"]
    assert torch.equal(sim.prototypes.state_dict()["prototypes"], saved["prototypes"])
    q = pseudo_label_quality(sim, cfg, (0.0, 0.5), max_images=4)
    a0, a5 = q["alphas"]["0.0"], q["alphas"]["0.5"]
    assert a0["object_pixels"] > 0 and a0["background_pixels"] > 0
    # The truth does not depend on alpha; shares are shares.
    assert (a0["object_pixels"], a0["background_pixels"]) == \
        (a5["object_pixels"], a5["background_pixels"])
    for s in (a0, a5):
        assert 0.0 <= s["object_fg"] + s["object_bg"] <= 1.0
        assert 0.0 <= s["background_fg"] + s["background_bg"] <= 1.0
    assert sum(c["pixels"] for c in q["m_inst_calibration"]) == \
        a0["object_pixels"] + a0["background_pixels"]
    # Above the largest blended value nothing is labelled foreground.
    cfg, sim, _ = load_run(tiny_run.out, ["sim.tau_high_range=[1.0,1.0]"])
    assert cfg.sim.tau_high_range == (1.0, 1.0)
    none = pseudo_label_quality(sim, cfg, (0.5,), max_images=4)["alphas"]["0.5"]
    assert none["object_fg"] == 0.0 and none["background_fg"] == 0.0
    assert none["background_bg"] == pytest.approx(a5["background_bg"])

    assert main([str(tiny_run.out), "--alphas", "0.5", "--max-images", "2", "--name", "pl",
                 "--out", str(tmp_path)]) == 0
    written = json.loads((tmp_path / "pl.json").read_text())
    assert written["runs"][0]["step"] == 6
    assert "fg precision" in (tmp_path / "pl.md").read_text()


def test_bad_run_folders(tiny_cfg, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        load_run(tmp_path)
    from training.train_config import save_config

    save_config(tiny_cfg(tmp_path, "sim.enabled=false"), tmp_path / "config.yaml")
    with pytest.raises(ValueError, match="not a SIM run"):
        load_run(tmp_path)
    save_config(tiny_cfg(tmp_path), tmp_path / "config.yaml")
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        load_run(tmp_path)
    (tmp_path / "checkpoints" / "step_0000001").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no SIM state in this checkpoint"):
        load_run(tmp_path)


@pytest.mark.slow
def test_quality_benchmark_records_the_label_precision(tiny_run) -> None:
    from benchmarks.quality import PSEUDO_LABEL_KEYS, sim_diagnostics

    cfg, sim, _ = load_run(tiny_run.out)
    diagnostics = sim_diagnostics(None, sim, cfg, None)
    expected = pseudo_label_quality(sim, cfg, (cfg.sim.alpha,))["alphas"][str(cfg.sim.alpha)]
    assert diagnostics["pseudo_labels"] == pytest.approx(
        {k: expected[k] for k in PSEUDO_LABEL_KEYS}, nan_ok=True)
    assert "prototypes" in diagnostics  # the separability numbers are still there
