"""Callbacks: how tests, benchmarks and tools look into a training run.

``train(cfg, callbacks=[...])`` calls every callback's methods at fixed points of the loop, on
every process, with the run's objects (:class:`TrainingRun`). Nothing inside the loop reads
flags or environment variables for them; a callback that should act once checks
``run.accelerator.is_main_process``. An exception raised by a callback stops training like any
other error (the last checkpoint stays intact).

    class PrintLoss(Callback):
        def on_step_end(self, run, losses):
            if run.accelerator.is_main_process:
                print(run.state.step, float(sum(losses.values())))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch import nn

    from serving.model import CondInst

    from .data import CocoInstanceDataset
    from .data.collate import Batch
    from .data.loader import TrainLoader
    from .run_state import RunState
    from .sim.iteration import SIMState
    from .train_config import TrainConfig


@dataclass
class TrainingRun:
    """The objects of one training run.

    Attributes:
        cfg: the resolved config (``model.num_classes`` set from the data).
        accelerator: the run's ``Accelerator``.
        model: the student as prepared by Accelerate (DDP-wrapped with several processes).
        student: the bare :class:`~serving.model.CondInst` inside ``model``.
        optimizer / scheduler: as prepared by Accelerate.
        sim: teacher, prototypes and memory bank (None without SIM).
        state: iteration counters (``state.step`` = optimiser steps done).
        dataset / loader: the training data and this process's batch stream.
        output_dir: the run folder.
        metrics: the latest evaluation (empty before the first one).
        saved_step: step of the newest checkpoint folder this run wrote (-1: none yet).
    """

    cfg: TrainConfig
    accelerator: Accelerator
    model: nn.Module
    student: CondInst
    optimizer: Any
    scheduler: Any
    sim: SIMState | None
    state: RunState
    dataset: CocoInstanceDataset
    loader: TrainLoader
    output_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    saved_step: int = -1


class Callback:
    """Base class: override the events you need (each does nothing here)."""

    def on_batch_start(self, run: TrainingRun, batch: Batch) -> None:
        """Before the forward pass of ``batch`` (on this process's device); ``run.state.step``
        is the index of the optimiser step the batch belongs to."""

    def on_step_end(self, run: TrainingRun, losses: dict[str, Tensor]) -> None:
        """After an optimiser step (``run.state.step`` already counts it), with the losses of
        its last batch (scalar tensors, detached from the graph only when you detach them)."""

    def on_train_end(self, run: TrainingRun) -> None:
        """After the last step, its checkpoint folder, the final evaluation (``run.metrics``)
        and ``model_final.safetensors`` with its calibration. The student may be switched to
        eval mode here."""


class CallbackList(Callback):
    """Calls each callback in order."""

    def __init__(self, callbacks: Sequence[Callback] = ()) -> None:
        self.callbacks = list(callbacks)

    def on_batch_start(self, run: TrainingRun, batch: Batch) -> None:
        for cb in self.callbacks:
            cb.on_batch_start(run, batch)

    def on_step_end(self, run: TrainingRun, losses: dict[str, Tensor]) -> None:
        for cb in self.callbacks:
            cb.on_step_end(run, losses)

    def on_train_end(self, run: TrainingRun) -> None:
        for cb in self.callbacks:
            cb.on_train_end(run)
