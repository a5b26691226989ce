"""The training data stream: sharded across processes, resumable to the exact batch.

Every sample's augmentation is drawn from a generator seeded by (seed, epoch, index), and the
epoch's order from (seed, epoch), so a run resumed from a checkpoint sees exactly the batches an
uninterrupted run would have seen, whatever the number of workers.
"""

from __future__ import annotations

import random
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from .augment import train_transform
from .collate import Batch, collate, derive_seed


class _AugmentedDataset(Dataset):
    """``dataset[i]`` augmented with a generator seeded by (seed, epoch, i)."""

    def __init__(self, dataset: Dataset, transform: Any, seed: int) -> None:
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        rng = random.Random(derive_seed(self.seed, self.epoch, i))
        return self.transform(self.dataset[i], rng)


class TrainLoader:
    """Yields :class:`Batch` objects of one process for one epoch, from a resume point."""

    def __init__(self, dataset: Dataset, cfg: Any, rank: int, world: int) -> None:
        data = cfg.data
        self.data = _AugmentedDataset(
            dataset, train_transform(data.min_sizes, data.max_size, data.flip_prob), cfg.seed)
        self.batch_size = cfg.optim.batch_size
        self.num_workers = data.num_workers
        self.seed = cfg.seed
        self.rank, self.world = rank, world

    def batches_per_epoch(self) -> int:
        return len(self.data) // (self.batch_size * self.world)

    def _indices(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, 1 << 20))
        order = torch.randperm(len(self.data), generator=g).tolist()
        per_step = self.batch_size * self.world
        usable = len(order) // per_step * per_step  # drop the last incomplete step
        return order[:usable][self.rank::self.world]

    def iterate(self, state: Any) -> Iterator[Batch]:
        """Batches of ``state.epoch`` after the ``state.batches_in_epoch`` already consumed."""
        if self.batches_per_epoch() == 0:
            raise ValueError(
                f"{len(self.data)} training images cannot fill one step of "
                f"{self.batch_size} x {self.world} processes; lower optim.batch_size"
            )
        self.data.epoch = state.epoch
        indices = self._indices(state.epoch)[state.batches_in_epoch * self.batch_size:]
        batches = [indices[i:i + self.batch_size] for i in range(0, len(indices),
                                                                   self.batch_size)]
        loader = DataLoader(self.data, batch_sampler=batches, collate_fn=collate,
                            num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                            persistent_workers=False)
        yield from loader


def build_train_loader(dataset: Dataset, cfg: Any, rank: int, world: int) -> TrainLoader:
    return TrainLoader(dataset, cfg, rank, world)
