"""Run bookkeeping saved with every checkpoint, and atomic checkpoint folders."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

CHECKPOINT_DIR = "checkpoints"
KEEP_LAST = 2


class RunState:
    """Iteration counters: they gate the warm-ups, so resuming continues them (SIM_SPEC 12.9).

    Attributes:
        step: optimiser steps done.
        epoch: current pass over the data.
        batches_in_epoch: batches of ``epoch`` already consumed (all processes alike).
    """

    def __init__(self) -> None:
        self.step = 0
        self.epoch = 0
        self.batches_in_epoch = 0

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batches_in_epoch = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])


def save_state_atomic(accelerator: Accelerator, output_dir: Path, step: int) -> Path:
    """``accelerator.save_state`` into a temp folder, renamed when complete; keeps the last 2.

    A run killed while saving leaves only a ``.tmp`` folder, never a half-written checkpoint.
    """
    root = Path(output_dir) / CHECKPOINT_DIR
    final = root / f"step_{step:07d}"
    tmp = root / f".step_{step:07d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        done = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in done[:-KEEP_LAST]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    done = sorted(p for p in (Path(output_dir) / CHECKPOINT_DIR).glob("step_*") if p.is_dir())
    return done[-1] if done else None
