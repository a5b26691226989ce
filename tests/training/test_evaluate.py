"""``python -m training.evaluate``: COCO mask and box AP of a checkpoint, and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import REPO

from serving.backends.locate import ACCEPTED
from training.evaluate import main

pytestmark = pytest.mark.slow

KEYS = {f"{kind}/{name}" for kind in ("segm", "bbox")
        for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "F1", "F1_threshold")}


def test_cli_writes_the_metrics_of_the_run(tiny_run, tiny_data, tmp_path: Path) -> None:
    output = tmp_path / "m.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "training.evaluate", "--checkpoint",
         str(tiny_run.out / "model_final.safetensors"), "--annotations",
         str(tiny_data.val_json), "--images", str(tiny_data.images), "--device", "cpu",
         "--output", str(output)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads(output.read_text())
    assert set(metrics) == KEYS
    assert json.loads(proc.stdout) == metrics  # printed and written alike
    # The checkpoint evaluated from disk scores what the run measured in memory at its end
    # (same Segmenter path, same inference settings stored in the checkpoint).
    in_run = json.loads((tiny_run.out / "metrics.json").read_text())
    assert metrics == {k: round(in_run[k], 3) for k in KEYS}


def test_missing_checkpoint_is_a_one_line_error(tiny_data, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.safetensors"
    code = main(["--checkpoint", str(missing), "--annotations", str(tiny_data.val_json),
                 "--images", str(tiny_data.images), "--output", str(tmp_path / "m.json")])
    assert code == 1
    captured = capsys.readouterr()
    assert captured.err == f"error: model {missing}: file not found; {ACCEPTED}\n"
    assert captured.out == ""
    assert not (tmp_path / "m.json").exists()


def test_missing_annotations_is_a_one_line_error(tiny_run, tiny_data, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "val.json"
    code = main(["--checkpoint", str(tiny_run.out / "model_final.safetensors"),
                 "--annotations", str(missing), "--images", str(tiny_data.images)])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: annotation file ") and str(missing) in err
    assert err.count("\n") == 1


def test_untrained_floor_is_saved_and_scores_nothing(tiny_data, tmp_path: Path) -> None:
    from train_helpers import TINY_CONFIG

    from serving.model.model_file import load_checkpoint
    from training.evaluate import evaluate_untrained
    from training.train_config import load_config

    cfg = load_config(TINY_CONFIG, tiny_data.overrides(tmp_path / "run"))
    path = tmp_path / "floor" / "untrained.safetensors"
    metrics = evaluate_untrained(cfg, path)
    assert set(metrics) == KEYS
    # Random heads with the FCOS prior (p = 0.01) detect nothing above the score threshold.
    assert metrics["segm/AP"] <= 0.0 and metrics["bbox/AP"] <= 0.0
    _, info = load_checkpoint(path)
    assert info.model.num_classes == cfg.model.num_classes == len(info.class_names)
