"""Checkpoint folders of a training run: written atomically, checked in full before a resume.

``<output_dir>/checkpoints/step_0000500/`` holds

- ``model.safetensors``, ``optimizer.bin``, ``scheduler.bin``, ``random_states_<rank>.pkl``
  (and ``scaler.pt`` with fp16): Accelerate's ``save_state``, read back by ``load_state``,
  which loads the ``.bin``/``.pkl``/``.pt`` files with ``torch.load(weights_only=True)``;
- ``sim_state.safetensors`` (teacher, prototypes; the same on every process) and
  ``memory_bank_<rank>.safetensors`` (each process's copy-paste bank), SIM runs only: tensors
  plus a JSON layout, never pickles;
- ``checkpoint.json``, written last: format, iteration counters, number of processes, the
  resolved config, and the size and SHA-256 of every other file.

Resuming (:func:`select_resume_point`) checks a folder before anything is loaded or written:
the manifest parses; the config matches the run's except for :data:`RUN_OPTIONS` (otherwise a
one-line :class:`~serving.errors.CheckpointError`); every file is there, with its recorded size
and hash, and reads with a tensor-only loader. ``--resume auto`` skips a damaged folder with a
one-line note and takes the newest intact one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from serving.config import config_to_dict
from serving.errors import CheckpointError

from .config import TrainConfig

if TYPE_CHECKING:
    from .callbacks import TrainingRun

CHECKPOINT_DIR = "checkpoints"
KEEP_LAST = 2
MANIFEST = "checkpoint.json"
SIM_STATE = "sim_state.safetensors"
FORMAT_NAME = "sim-training-checkpoint"
FORMAT_VERSION = 1
#: Config keys (and sections, ending in ".") a resumed run may change: they decide what is
#: logged, evaluated and where, not what is learned.
RUN_OPTIONS = ("output_dir", "log_every", "eval_every", "checkpoint_every", "log_images_every",
               "data.num_workers", "data.val_json", "data.val_images", "data.max_val_images",
               "inference.")
_PICKLED = (".bin", ".pkl", ".pt")


class DamagedCheckpoint(CheckpointError):
    """A checkpoint folder is incomplete or corrupt (an older folder may be intact)."""

    def __init__(self, folder: Path, reason: str) -> None:
        super().__init__(f"checkpoint {folder} is damaged ({reason}); --resume auto falls back "
                         "to the newest intact checkpoint")
        self.reason = reason


@dataclass
class ResumePoint:
    """A checked checkpoint folder and the state read from it for this process."""

    path: Path
    run_state: dict[str, Any]
    sim_state: dict[str, Any] | None
    bank_state: dict[str, Any] | None


def memory_bank_file(rank: int) -> str:
    return f"memory_bank_{rank}.safetensors"


# --------------------------------------------------------------------------- tensor files
def _pack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous().clone()
        return {"$tensor": name}
    if isinstance(obj, dict):
        return {str(k): _pack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_pack(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a tensor file")


def _unpack(layout: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(layout, dict):
        if set(layout) == {"$tensor"}:
            return tensors[layout["$tensor"]]
        return {k: _unpack(v, tensors) for k, v in layout.items()}
    if isinstance(layout, list):
        return [_unpack(v, tensors) for v in layout]
    return layout


def write_tensor_state(path: Path, state: Any) -> None:
    """Store nested dicts/lists of tensors and plain values as safetensors + a JSON layout."""
    tensors: dict[str, torch.Tensor] = {}
    layout = _pack(state, tensors)
    save_file(tensors, str(path), metadata={"layout": json.dumps(layout)})


def read_tensor_state(path: Path) -> Any:
    """Read what :func:`write_tensor_state` stored (no pickle involved)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            layout = json.loads((f.metadata() or {})["layout"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        return _unpack(layout, tensors)
    except (SafetensorError, OSError, KeyError, TypeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not a readable state file ({_one_line(exc)})") from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


# --------------------------------------------------------------------------- writing
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_manifest(folder: Path, run: TrainingRun) -> None:
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
                "run_state": run.state.state_dict(),
                "num_processes": run.accelerator.num_processes,
                "config": config_to_dict(run.cfg), "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


def save_checkpoint_folder(run: TrainingRun) -> Path:
    """Write ``checkpoints/step_<step>`` (all processes call this); keeps the last two.

    Everything goes to a temporary folder that is renamed when complete, so a run killed while
    saving leaves only a ``.tmp`` folder, never a half-written checkpoint.
    """
    acc = run.accelerator
    root = run.output_dir / CHECKPOINT_DIR
    final = root / f"step_{run.state.step:07d}"
    tmp = root / f".step_{run.state.step:07d}.tmp"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    if run.sim is not None:
        write_tensor_state(tmp / memory_bank_file(acc.process_index), run.sim.bank.state_dict())
    acc.wait_for_everyone()
    if acc.is_main_process:
        if run.sim is not None:
            write_tensor_state(tmp / SIM_STATE, run.sim.state_dict())
        _write_manifest(tmp, run)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoint_folders(run.output_dir)[KEEP_LAST:]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    run.saved_step = run.state.step
    return final


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """The run's checkpoint folders, newest first (unchecked)."""
    return sorted((p for p in (Path(output_dir) / CHECKPOINT_DIR).glob("step_*") if p.is_dir()),
                  reverse=True)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint folder of a run (unchecked), or None."""
    folders = checkpoint_folders(output_dir)
    return folders[0] if folders else None


# --------------------------------------------------------------------------- checking
def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise DamagedCheckpoint(folder, f"no {MANIFEST}: unfinished, or written by an older "
                                        "version")
    try:
        manifest = json.loads(path.read_text())
        ok = manifest["format"] == FORMAT_NAME and isinstance(manifest["files"], dict) and \
            isinstance(manifest["config"], dict) and isinstance(manifest["run_state"], dict)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        ok = False
    if not ok:
        raise DamagedCheckpoint(folder, f"{MANIFEST} is unreadable")
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {folder}: format version {manifest.get('version')} "
                              f"is not this version's ({FORMAT_VERSION}); resume it with the "
                              "version that wrote it")
    return manifest


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"key: saved -> current"`` for every key that differs, run options excepted."""
    a, b = _flatten(saved), _flatten(current)
    keys = sorted(set(a) | set(b))
    return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in keys
            if a.get(k) != b.get(k) and not any(k == o or (o.endswith(".") and k.startswith(o))
                                                for o in RUN_OPTIONS)]


def _check_same_run(folder: Path, manifest: dict[str, Any], cfg: TrainConfig,
                    num_processes: int) -> None:
    diffs = config_differences(manifest["config"], config_to_dict(cfg))
    if diffs:
        more = f"; {len(diffs) - 2} more" if len(diffs) > 2 else ""
        raise CheckpointError(
            f"resume: {folder} was written with another config ({'; '.join(diffs[:2])}{more}); "
            f"resume with the run's own config (--config {Path(cfg.output_dir) / 'config.yaml'})"
            " or train into a new output_dir")
    if manifest.get("num_processes") != num_processes:
        raise CheckpointError(
            f"resume: {folder} was written by {manifest.get('num_processes')} process(es), "
            f"this run has {num_processes}; resume with the same number of processes")


def _required_files(cfg: TrainConfig, num_processes: int) -> set[str]:
    names = {"model.safetensors", "optimizer.bin", "scheduler.bin",
             *(f"random_states_{r}.pkl" for r in range(num_processes))}
    if cfg.uses_sim:
        names |= {SIM_STATE, *(memory_bank_file(r) for r in range(num_processes))}
    return names


def _check_files(folder: Path, manifest: dict[str, Any], cfg: TrainConfig,
                 num_processes: int) -> None:
    listed: dict[str, Any] = manifest["files"]
    present = {p.name for p in folder.iterdir() if p.is_file()} - {MANIFEST}
    for name in sorted(_required_files(cfg, num_processes) | set(listed)):
        if name not in present:
            raise DamagedCheckpoint(folder, f"{name} is missing")
        if name not in listed:
            raise DamagedCheckpoint(folder, f"{name} is not listed in {MANIFEST}")
    extra = sorted(present - set(listed))
    if extra:
        raise DamagedCheckpoint(folder, f"unexpected file {extra[0]}")
    for name, info in sorted(listed.items()):
        path = folder / name
        size = path.stat().st_size
        expected = info.get("bytes") if isinstance(info, dict) else None
        if size != expected:
            raise DamagedCheckpoint(folder, f"{name} has {size} bytes, {MANIFEST} says "
                                            f"{expected}")
        if _sha256(path) != info.get("sha256"):
            raise DamagedCheckpoint(folder, f"{name} does not match its SHA-256 in {MANIFEST}")


def _check_readable(folder: Path, manifest: dict[str, Any]) -> None:
    """Every file parses with a tensor-only loader (pickles: ``weights_only=True``)."""
    from accelerate.utils import load  # torch.load(weights_only=True), numpy RNG arrays allowed

    for name in sorted(manifest["files"]):
        path = folder / name
        try:
            if name.endswith(".safetensors"):
                with safe_open(str(path), framework="pt"):
                    pass  # the header and its offsets are checked on opening
            elif name.endswith(_PICKLED):
                load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure to parse means damaged
            raise DamagedCheckpoint(folder, f"{name} cannot be read as tensors "
                                            f"({_one_line(exc)})") from None


def _check_counters(folder: Path, manifest: dict[str, Any], cfg: TrainConfig) -> None:
    """The iteration counters: whole numbers, ``0 <= step <= optim.max_iter``."""
    state = manifest.get("run_state")
    keys = ("step", "epoch", "batches_in_epoch")
    if not isinstance(state, dict) or not all(
            isinstance(state.get(k), int) and not isinstance(state.get(k), bool)
            and 0 <= state[k] <= 10**12 for k in keys):
        raise DamagedCheckpoint(folder, f"{MANIFEST} has no valid iteration counters (whole "
                                        "numbers >= 0)")
    if state["step"] > cfg.optim.max_iter:
        raise DamagedCheckpoint(folder, f"{MANIFEST} says step {state['step']}, beyond "
                                        f"optim.max_iter={cfg.optim.max_iter}")


def read_resume_point(folder: Path, cfg: TrainConfig, num_processes: int,
                      rank: int) -> ResumePoint:
    """Check checkpoint ``folder`` for resuming ``cfg`` and read this process's state.

    Raises:
        DamagedCheckpoint: a file is missing, unexpected, truncated, altered or unreadable.
        CheckpointError: the folder belongs to another config or number of processes.
    """
    if not folder.is_dir():
        raise CheckpointError(f"resume: {folder} is not a checkpoint folder; pass "
                              f"<output_dir>/{CHECKPOINT_DIR}/step_* or 'auto'")
    manifest = _read_manifest(folder)
    _check_counters(folder, manifest, cfg)
    _check_same_run(folder, manifest, cfg, num_processes)
    _check_files(folder, manifest, cfg, num_processes)
    _check_readable(folder, manifest)
    sim_state = bank_state = None
    if cfg.uses_sim:
        try:
            sim_state = read_tensor_state(folder / SIM_STATE)
            bank_state = read_tensor_state(folder / memory_bank_file(rank))
        except CheckpointError as exc:
            raise DamagedCheckpoint(folder, str(exc)) from None
    return ResumePoint(folder, manifest["run_state"], sim_state, bank_state)


def select_resume_point(cfg: TrainConfig, resume: str | None, num_processes: int, rank: int,
                        note: Callable[[str], None] = print,
                        apply: Callable[[ResumePoint], None] | None = None,
                        ) -> ResumePoint | None:
    """The checkpoint to resume from: ``resume`` is a folder, ``"auto"`` (the newest intact
    folder of ``cfg.output_dir``; damaged ones are skipped with a ``note``) or None (start
    from scratch). ``apply(point)`` (e.g. :func:`restore` into a built run) is part of the
    check: a folder whose contents cannot be applied (crafted shapes or values) is damaged
    too, and ``"auto"`` falls back to the next. Writes nothing; every process decides alike."""
    if not resume:
        return None
    if resume != "auto":
        point = read_resume_point(Path(resume), cfg, num_processes, rank)
        if apply is not None:
            apply(point)
        return point
    folders = checkpoint_folders(cfg.output_dir)
    if not folders:
        note("resume: no checkpoint found, starting from scratch")
        return None
    for folder in folders:
        try:
            point = read_resume_point(folder, cfg, num_processes, rank)
            if apply is not None:
                apply(point)
            return point
        except DamagedCheckpoint as exc:
            note(f"resume: skipping damaged {folder} ({exc.reason})")
    raise CheckpointError(
        f"resume: no intact checkpoint in {Path(cfg.output_dir) / CHECKPOINT_DIR} (all "
        f"{len(folders)} damaged, see above); restore them, or move them away to start over")


def restore(run: TrainingRun, point: ResumePoint) -> None:
    """Load a checked checkpoint into the run: Accelerate's state (model, optimizer,
    scheduler, scaler, RNG), the iteration counters and SIM's state.

    Contents that pass the file checks but do not fit the run (a crafted tensor shape, SIM
    state or bank capacity) raise :class:`DamagedCheckpoint`.
    """
    try:
        run.accelerator.load_state(str(point.path))
    except Exception as exc:  # noqa: BLE001 - checked before, so crafted or damaged
        raise DamagedCheckpoint(point.path, f"its state cannot be loaded "
                                            f"({_one_line(exc)})") from None
    run.state.load_state_dict(point.run_state)
    if run.sim is not None and point.sim_state is not None:
        try:
            run.sim.load_state_dict(point.sim_state)
            run.sim.bank.load_state_dict(point.bank_state)
        except Exception as exc:  # noqa: BLE001 - any misfit of the stored SIM state
            raise DamagedCheckpoint(point.path, f"its SIM state does not fit this run "
                                                f"({_one_line(exc)})") from None
    run.saved_step = run.state.step
