"""Helpers of the training-loop tests (imported by tests/training/conftest.py and the tests).

An untrained teacher's maps never pass the paper's thresholds (M_I stays near 0.5, so no pixel
exceeds 0.7 and the blended map never leaves the ignored band), so :data:`SIM_EXERCISE` lowers
them: within a few tiny steps the pseudo loss is non-zero, the prototypes move (momentum 0.9)
and the memory bank fills and is pasted from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"

#: Overrides that make every SIM part act on an untrained model within a few steps.
SIM_EXERCISE = (
    "sim.tau_high_range=[0.5, 0.5]",
    "sim.prototype_pixel_threshold=0.0",
    "sim.prototype_momentum=0.9",
)


@dataclass
class TinyData:
    root: Path
    train_json: Path
    val_json: Path
    images: Path

    def overrides(self, output_dir: Path | str) -> list[str]:
        return [f"output_dir={output_dir}", f"data.train_json={self.train_json}",
                f"data.train_images={self.images}", f"data.val_json={self.val_json}",
                f"data.val_images={self.images}"]


@dataclass
class StepRecord:
    step: int
    losses: dict[str, float]
    image_ids: list[int]
    #: Snapshot of the SIM state the step started from (None without SIM).
    prototypes: torch.Tensor | None
    bank_size: int | None
    teacher: dict[str, torch.Tensor] | None


class SimulatedCrash(RuntimeError):
    """Raised by :class:`Recorder` before step ``crash_at``."""


@dataclass
class Recorder(Callback):
    """A training callback that records every batch (step, image ids, losses, SIM state at
    the first batch); optionally raises :class:`SimulatedCrash` before step ``crash_at``."""

    records: list[StepRecord] = field(default_factory=list)
    crash_at: int | None = None
    snapshot_first: bool = True

    def on_batch_start(self, run, batch) -> None:
        step, sim = run.state.step, run.sim
        if self.crash_at is not None and step == self.crash_at:
            raise SimulatedCrash(f"simulated crash before step {step + 1}")
        snap = self.snapshot_first and not self.records and sim is not None
        self.records.append(StepRecord(
            step, {}, list(batch.image_ids),
            sim.prototypes.prototypes.detach().clone() if snap else None,
            len(sim.bank) if sim is not None else None,
            {k: v.detach().clone() for k, v in sim.teacher.state_dict().items()}
            if snap else None))

    def on_step_end(self, run, losses) -> None:
        self.records[-1].losses = {k: float(v.detach()) for k, v in losses.items()}


class StopTraining(Exception):
    """Raised by :class:`StopAtFirstBatch`."""


class StopAtFirstBatch(Callback):
    """Records the step and SIM state a (resumed) run starts from, then stops it."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.bank_size: int | None = None

    def on_batch_start(self, run, batch) -> None:
        self.step = run.state.step
        self.bank_size = None if run.sim is None else len(run.sim.bank)
        raise StopTraining


@dataclass
class TinyRun:
    """Run A: 6 uninterrupted SIM steps with evaluation (shared by loop/resume/eval tests)."""

    cfg: Any
    out: Path
    result: dict[str, Any]
    records: list[StepRecord]


