"""Training entry point of ``test_train_distributed.py``, started by ``accelerate launch``.

``python distributed_run.py --config C [key=value ...]`` trains like ``python -m training``
with one callback: every process writes ``<output_dir>/per_rank/rank<r>.pt`` with its final
prototypes and the image ids of every batch it trained on (the checkpoint holds the prototypes
once, from the main process).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from training.callbacks import Callback
from training.train import train
from training.train_config import load_config


class PerRankRecord(Callback):
    def __init__(self) -> None:
        self.image_ids: list[list[int]] = []

    def on_batch_start(self, run, batch) -> None:
        self.image_ids.append(list(batch.image_ids))

    def on_train_end(self, run) -> None:
        rank = run.accelerator.process_index
        folder = Path(run.output_dir) / "per_rank"
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"prototypes": run.sim.prototypes.prototypes.detach().cpu(),
                    "image_ids": self.image_ids, "step": run.state.step, "rank": rank},
                   folder / f"rank{rank}.pt")


if __name__ == "__main__":
    assert sys.argv[1] == "--config"
    train(load_config(sys.argv[2], sys.argv[3:]), callbacks=[PerRankRecord()])
