"""Resuming from damaged, foreign or crafted checkpoint folders (DESIGN.md section 7).

One tiny SIM run crashes before its third step, leaving checkpoint folders for steps 1 and 2.
Each test damages a copy of that run folder and resumes it: a damaged newest folder is skipped
with a one-line note in favour of step 1; a folder of another config is refused with a one-line
error before anything in the run folder changes; a crafted pickle is never executed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from train_helpers import SIM_EXERCISE, Recorder, SimulatedCrash, StopAtFirstBatch, StopTraining

from serving.errors import CheckpointError
from training.run_checkpoints import (
    CHECKPOINT_DIR,
    MANIFEST,
    SIM_STATE,
    load_sim_state,
    memory_bank_file,
    read_tensor_state,
    write_tensor_state,
)
from training.train import main, train

pytestmark = pytest.mark.slow

RUN = ("optim.max_iter=3", "checkpoint_every=1", "data.val_json=null", "sim.start_iter=0",
       *SIM_EXERCISE)


@pytest.fixture(scope="module")
def crashed_run(tiny_cfg, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("crashed")
    with pytest.raises(SimulatedCrash):
        train(tiny_cfg(out, *RUN), callbacks=[Recorder(crash_at=2)])
    assert sorted(p.name for p in (out / CHECKPOINT_DIR).iterdir()) == \
        ["step_0000001", "step_0000002"]
    return out


@pytest.fixture
def run_copy(crashed_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(crashed_run, out)
    return out


def _resume(tiny_cfg, out: Path, *extra: str, resume: str = "auto") -> int:
    """Resume ``out``; returns the step of the first batch trained (training stops there)."""
    stop = StopAtFirstBatch()
    with pytest.raises(StopTraining):
        train(tiny_cfg(out, *RUN, *extra), resume=resume, callbacks=[stop])
    assert stop.bank_size is not None  # the SIM state came back too
    return stop.step


def _relist(folder: Path, name: str) -> None:
    """Record ``name``'s current size and hash in the manifest (a consistent forgery)."""
    manifest = json.loads((folder / MANIFEST).read_text())
    data = (folder / name).read_bytes()
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / MANIFEST).write_text(json.dumps(manifest))


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file()}


def test_intact_folder_resumes_at_its_step(tiny_cfg, run_copy: Path, capsys) -> None:
    assert _resume(tiny_cfg, run_copy) == 2
    out = capsys.readouterr().out
    assert f"resumed from {run_copy / CHECKPOINT_DIR / 'step_0000002'} at step 2" in out
    assert "skipping" not in out


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * (path.stat().st_size // 256 + 1))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _state(change):
    """A spoiler that rewrites a tensor-state file with ``change(state)``."""
    def spoil(path: Path) -> None:
        write_tensor_state(path, change(read_tensor_state(path)))
    return spoil


def _deep_layout(path: Path) -> None:
    save_file({}, str(path), metadata={"layout": "[" * 100_000 + "]" * 100_000})


def _counters(**values):
    def spoil(path: Path) -> None:
        manifest = json.loads(path.read_text())
        manifest["run_state"].update(values)
        path.write_text(json.dumps(manifest))
    return spoil


def _reshaped_weights(path: Path) -> None:
    tensors = load_file(str(path))
    name = next(k for k, v in tensors.items() if v.dim() == 4)
    tensors[name] = tensors[name].flatten()[:-1].clone()
    save_file(tensors, str(path))


DAMAGES = {
    "SIM state a list, manifest forged": (SIM_STATE, _state(lambda s: [1, 2]), True,
                                          r"its SIM state does not fit this run"),
    "deep SIM state, manifest forged": (SIM_STATE, _deep_layout, True,
                                        r"sim_state\.safetensors: not a readable state file"),
    "bank capacity -1, manifest forged": (memory_bank_file(0),
                                          _state(lambda s: {**s, "capacity": -1}), True,
                                          r"its SIM state does not fit this run"),
    "a weight of the wrong shape, manifest forged": ("model.safetensors", _reshaped_weights,
                                                     True, r"its state cannot be loaded"),
    "step 1e30 in checkpoint.json": (MANIFEST, _counters(step=1e30), False,
                                     r"no valid iteration counters"),
    "step -100 in checkpoint.json": (MANIFEST, _counters(step=-100), False,
                                     r"no valid iteration counters"),
    "truncated model.safetensors": ("model.safetensors", _truncate, False,
                                    r"model\.safetensors has \d+ bytes, checkpoint\.json says"),
    "garbage optimizer.bin": ("optimizer.bin", _garbage, False,
                              r"optimizer\.bin has \d+ bytes"),
    "garbage optimizer.bin, manifest forged": ("optimizer.bin", _garbage, True,
                                               r"optimizer\.bin cannot be read as tensors"),
    "empty SIM state": (SIM_STATE, _empty, False, r"sim_state\.safetensors has 0 bytes"),
    "empty memory bank, manifest forged": (memory_bank_file(0), _empty, True,
                                           r"memory_bank_0\.safetensors cannot be read"),
    "missing RNG file": ("random_states_0.pkl", Path.unlink, False,
                         r"random_states_0\.pkl is missing"),
    "missing manifest": (MANIFEST, Path.unlink, False,
                         r"no checkpoint\.json: unfinished, or written by an older version"),
    "a bit flipped in the weights": ("model.safetensors",
                                     lambda p: p.write_bytes(p.read_bytes()[:-1] + b"\x01"),
                                     False, r"model\.safetensors does not match its SHA-256"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_newest_folder_falls_back_with_a_note(tiny_cfg, run_copy: Path, capsys,
                                                      damage: str) -> None:
    name, spoil, forge, reason = DAMAGES[damage]
    newest = run_copy / CHECKPOINT_DIR / "step_0000002"
    spoil(newest / name)
    if forge:
        _relist(newest, name)
    assert _resume(tiny_cfg, run_copy) == 1
    lines = capsys.readouterr().out.splitlines()
    notes = [line for line in lines if line.startswith("resume: skipping")]
    assert len(notes) == 1
    assert notes[0].startswith(f"resume: skipping damaged {newest} (")
    assert re.search(reason, notes[0]), notes[0]
    assert any(line.startswith(f"resumed from {newest.with_name('step_0000001')} at step 1")
               for line in lines)


def test_named_damaged_folder_is_an_error_not_a_fallback(tiny_cfg, run_copy: Path) -> None:
    newest = run_copy / CHECKPOINT_DIR / "step_0000002"
    _truncate(newest / "optimizer.bin")
    with pytest.raises(CheckpointError, match=r"is damaged \(optimizer\.bin has \d+ bytes.*"
                                              r"--resume auto falls back") as info:
        train(tiny_cfg(run_copy, *RUN), resume=str(newest))
    assert "\n" not in str(info.value)


class _Evil:
    """Unpickling this creates ``path`` (what a crafted checkpoint file could do)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_crafted_pickles_are_never_executed(tiny_cfg, run_copy: Path, tmp_path: Path,
                                            capsys) -> None:
    # The crafted file works: an unrestricted unpickler creates the marker file.
    probe, probe_marker = tmp_path / "probe.bin", tmp_path / "probe_marker"
    torch.save({"state": _Evil(probe_marker)}, probe)
    torch.load(probe, weights_only=False)
    assert probe_marker.exists()

    marker = tmp_path / "pwned"
    root = run_copy / CHECKPOINT_DIR
    # Newest folder: the optimizer state replaced, manifest forged to match.
    torch.save({"state": _Evil(marker)}, root / "step_0000002" / "optimizer.bin")
    _relist(root / "step_0000002", "optimizer.bin")
    # Older folder: Accelerate's old custom-state pickle added and listed.
    torch.save({"step": _Evil(marker)}, root / "step_0000001" / "custom_checkpoint_0.pkl")
    _relist(root / "step_0000001", "custom_checkpoint_0.pkl")
    before = (run_copy / "config.yaml").read_bytes()
    with pytest.raises(CheckpointError, match=r"^resume: no intact checkpoint in .*all 2 "
                                              r"damaged") as info:
        train(tiny_cfg(run_copy, *RUN), resume="auto")
    assert "\n" not in str(info.value)
    assert not marker.exists()
    notes = [line for line in capsys.readouterr().out.splitlines() if "skipping" in line]
    assert len(notes) == 2
    assert "optimizer.bin cannot be read as tensors (UnpicklingError" in notes[0]
    assert "custom_checkpoint_0.pkl cannot be read as tensors (UnpicklingError" in notes[1]
    assert (run_copy / "config.yaml").read_bytes() == before


def test_unlisted_extra_file_is_damage(tiny_cfg, run_copy: Path, tmp_path: Path,
                                       capsys) -> None:
    marker = tmp_path / "pwned"
    newest = run_copy / CHECKPOINT_DIR / "step_0000002"
    torch.save({"step": _Evil(marker)}, newest / "custom_checkpoint_1.pkl")
    assert _resume(tiny_cfg, run_copy) == 1
    assert "unexpected file custom_checkpoint_1.pkl" in capsys.readouterr().out
    assert not marker.exists()


def test_another_config_is_refused_without_touching_the_run(tiny_cfg, run_copy: Path,
                                                            capsys) -> None:
    before = _snapshot(run_copy)
    with pytest.raises(CheckpointError) as info:
        train(tiny_cfg(run_copy, *RUN, "model.fpn_channels=16", "sim.alpha=0.25"),
              resume="auto")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"resume: {run_copy / CHECKPOINT_DIR / 'step_0000002'} was "
                              "written with another config (model.fpn_channels: 32 -> 16; "
                              "sim.alpha: 0.5 -> 0.25); resume with the run's own config "
                              f"(--config {run_copy / 'config.yaml'})")
    assert _snapshot(run_copy) == before  # config.yaml, checkpoints, logs: all as they were
    # The command line says the same in one line.
    code = main(["--config", str(run_copy / "config.yaml"), "--resume",
                 f"output_dir={run_copy}", "model.fpn_channels=16"])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: resume: ") and "another config" in err[0]
    assert _snapshot(run_copy) == before
    # Run options may change: they do not change what is learned. The loader worker is
    # forked in a fresh interpreter, not from this test process (whose other threads may hold
    # a lock that a fork would copy, locked, into the worker).
    proc = subprocess.run(
        [sys.executable, "-m", "sim_cli", "train", "--config", str(run_copy / "config.yaml"),
         "--resume", f"output_dir={run_copy}", "log_every=5", "data.num_workers=1"],
        cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resumed from {run_copy / CHECKPOINT_DIR / 'step_0000002'} at step 2" in proc.stdout
    assert (run_copy / "model_final.safetensors").is_file()


def test_another_number_of_processes_is_refused(tiny_cfg, run_copy: Path) -> None:
    for folder in (run_copy / CHECKPOINT_DIR).iterdir():
        manifest = json.loads((folder / MANIFEST).read_text())
        manifest["num_processes"] = 2
        (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"written by 2 process\(es\), this run has 1; "
                                              r"resume with the same number of processes"):
        train(tiny_cfg(run_copy, *RUN), resume="auto")


def test_sim_state_loads_outside_a_run(tiny_cfg, crashed_run: Path, tmp_path: Path) -> None:
    from serving.model import build_condinst
    from training.sim.iteration import SIMState

    cfg = tiny_cfg(tmp_path / "fresh", *RUN)
    classes = len(json.loads(Path(cfg.data.train_json).read_text())["categories"])
    cfg.model = dataclasses.replace(cfg.model, num_classes=classes)
    sim = SIMState(build_condinst(cfg.model), cfg, torch.device("cpu"))
    folder = crashed_run / CHECKPOINT_DIR / "step_0000002"
    load_sim_state(sim, folder)
    saved = read_tensor_state(folder / SIM_STATE)
    for part, module in (("prototypes", sim.prototypes), ("teacher", sim.teacher)):
        loaded = module.state_dict()
        assert saved[part] and all(torch.equal(loaded[k], v) for k, v in saved[part].items())
    bank = read_tensor_state(folder / memory_bank_file(0))
    assert len(sim.bank.state_dict()["entries"]) == len(bank["entries"])
    with pytest.raises(CheckpointError, match=r"no SIM state in this checkpoint"):
        load_sim_state(sim, tmp_path)
