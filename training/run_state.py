"""Iteration counters of a run, saved with every checkpoint (``training.run_checkpoints``)."""

from __future__ import annotations

from typing import Any


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

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])
