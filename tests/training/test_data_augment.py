"""Resize/flip geometry, collate padding, and the seeded, resumable training loader."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from training.data.augment import (
    Compose,
    RandomHorizontalFlip,
    ResizeShortestEdge,
    hflip_sample,
    resize_sample,
    train_transform,
)
from training.data.collate import Batch, collate, derive_seed
from training.data.loader import TrainLoader


def _sample(h: int, w: int, boxes: list[list[float]], masks: bool = False) -> dict[str, Any]:
    g = torch.Generator().manual_seed(h * 1000 + w)
    s = {"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g),
         "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
         "labels": torch.arange(len(boxes), dtype=torch.int64),
         "image_id": h, "orig_size": (h, w), "image_size": (h, w)}
    if masks:
        m = torch.zeros((len(boxes), h, w), dtype=torch.bool)
        for k, (x1, y1, x2, y2) in enumerate(boxes):
            m[k, int(y1):int(y2), int(x1):int(x2)] = True
        s["masks"] = m
    return s


@pytest.mark.parametrize("hw,short,max_size,expected", [
    ((480, 640), 800, 1333, (800, 1067)),   # 640 * 800 / 480 = 1066.67
    ((100, 1000), 800, 1333, (133, 1333)),  # limited by max: 100 * 1333 / 1000 = 133.3
    ((1000, 100), 800, 1333, (1333, 133)),
    ((320, 320), 512, 853, (512, 512)),
    ((375, 500), 600, 1000, (600, 800)),
])
def test_resize_sizes_by_hand(hw: tuple[int, int], short: int, max_size: int,
                              expected: tuple[int, int]) -> None:
    assert ResizeShortestEdge([short], max_size).output_size(*hw) == expected


def test_resize_scales_boxes_exactly_and_masks_nearest() -> None:
    s = _sample(480, 640, [[10, 20, 30, 40], [0, 0, 640, 480]])
    out = ResizeShortestEdge([800], 1333)(s)
    assert out["image"].shape == (3, 800, 1067) and out["image"].dtype == torch.uint8
    assert out["image_size"] == (800, 1067) and out["orig_size"] == (480, 640)
    sx, sy = 1067 / 640, 800 / 480
    expected = torch.tensor([[10 * sx, 20 * sy, 30 * sx, 40 * sy], [0, 0, 1067, 800]])
    assert torch.allclose(out["boxes"], expected, rtol=0, atol=1e-4)
    m = _sample(4, 6, [[0, 0, 3, 2]], masks=True)
    m2 = resize_sample(m, (8, 12))["masks"][0]
    expected_mask = torch.zeros((8, 12), dtype=torch.bool)
    expected_mask[:4, :6] = True
    assert torch.equal(m2, expected_mask)


def test_resize_keeps_constant_image_and_identity_size() -> None:
    s = _sample(30, 40, [[1, 2, 3, 4]])
    s["image"] = torch.full((3, 30, 40), 77, dtype=torch.uint8)
    out = resize_sample(s, (45, 60))
    assert bool((out["image"] == 77).all())
    same = resize_sample(s, (30, 40))
    assert same["image"] is s["image"] and same["boxes"] is s["boxes"]


def test_random_sizes_are_seeded() -> None:
    t = ResizeShortestEdge([100, 200, 300], 10_000)
    a = [t.output_size(50, 50, random.Random(4))[0] for _ in range(3)]
    rng1, rng2 = random.Random(9), random.Random(9)
    seq1 = [t.output_size(50, 50, rng1)[0] for _ in range(30)]
    seq2 = [t.output_size(50, 50, rng2)[0] for _ in range(30)]
    assert seq1 == seq2 and set(seq1) == {100, 200, 300} and len(set(a)) == 1
    g = torch.Generator().manual_seed(0)
    ranged = ResizeShortestEdge([100, 110], 10_000, sample="range")
    shorts = {ranged.output_size(50, 80, g)[0] for _ in range(50)}
    assert shorts <= set(range(100, 111)) and len(shorts) > 3


def test_flip_maps_boxes_and_masks() -> None:
    s = _sample(10, 20, [[2, 1, 5, 4], [15, 0, 20, 10]], masks=True)
    f = hflip_sample(s)
    assert f["boxes"].tolist() == [[15, 1, 18, 4], [0, 0, 5, 10]]  # x1' = W - x2
    assert torch.equal(f["image"][:, :, 0], s["image"][:, :, 19])
    ys, xs = np.nonzero(f["masks"][0].numpy())
    assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == [15, 1, 18, 4]
    back = hflip_sample(f)
    assert torch.equal(back["boxes"], s["boxes"]) and torch.equal(back["image"], s["image"])
    assert RandomHorizontalFlip(0.0)(s) is s
    assert RandomHorizontalFlip(1.0)(s)["boxes"].tolist() == f["boxes"].tolist()


def test_compose_passes_rng() -> None:
    t = train_transform([16, 24], 1000, flip_p=0.5)
    assert isinstance(t, Compose)
    s = _sample(32, 48, [[0, 0, 8, 8]])
    first, second = t(s, random.Random(3)), t(s, random.Random(3))
    assert torch.equal(first["image"], second["image"])
    assert torch.equal(first["boxes"], second["boxes"])


def test_collate_pads_to_32_with_exact_valid_masks() -> None:
    a = _sample(50, 70, [[1, 1, 10, 10]], masks=True)
    b = _sample(64, 33, [[0, 0, 5, 5], [3, 3, 30, 60]], masks=True)
    batch = collate([a, b])
    assert isinstance(batch, Batch) and len(batch) == 2
    assert batch.images.shape == (2, 3, 64, 96) and batch.images.dtype == torch.uint8
    assert batch.valid.shape == (2, 64, 96) and batch.valid.dtype == torch.bool
    for i, (h, w) in enumerate([(50, 70), (64, 33)]):
        assert int(batch.valid[i].sum()) == h * w and bool(batch.valid[i, :h, :w].all())
        assert bool((batch.images[i][:, ~batch.valid[i]] == 0).all())
        assert batch.masks[i].shape[1:] == (64, 96)
    assert torch.equal(batch.images[1, :, :64, :33], b["image"])
    assert batch.image_sizes == [(50, 70), (64, 33)] and batch.image_ids == [50, 64]
    assert [t.shape for t in batch.boxes] == [(1, 4), (2, 4)]
    assert batch.masks[1][1].sum() == b["masks"][1].sum()
    moved = batch.to("cpu")
    assert torch.equal(moved.images, batch.images)
    no_masks = collate([_sample(8, 8, [[0, 0, 1, 1]])], size_divisibility=32)
    assert no_masks.masks is None and no_masks.images.shape == (1, 3, 32, 32)


class _RandomSizes(Dataset):
    """Tiny in-memory dataset; the loader applies the random resize/flip."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> dict[str, Any]:
        return _sample(20 + i, 30, [[i, 0, 30, 10]])


def _cfg(seed: int, workers: int) -> Any:
    from types import SimpleNamespace

    data = SimpleNamespace(min_sizes=(16, 20, 24), max_size=64, flip_prob=0.5,
                           num_workers=workers)
    return SimpleNamespace(data=data, optim=SimpleNamespace(batch_size=4), seed=seed)


def _run(loader: TrainLoader, epoch: int, skip: int = 0) -> list[tuple[list[int], list]]:
    state = SimpleState(epoch, skip)
    return [(b.image_ids, torch.cat(b.boxes).tolist()) for b in loader.iterate(state)]


class SimpleState:
    def __init__(self, epoch: int, batches_in_epoch: int) -> None:
        self.epoch, self.batches_in_epoch = epoch, batches_in_epoch


@pytest.mark.parametrize("workers", [0])
def test_loader_is_deterministic_per_seed_and_epoch(workers: int) -> None:
    def make(seed: int) -> TrainLoader:
        return TrainLoader(_RandomSizes(), _cfg(seed, workers), rank=0, world=1)

    a, b = make(5), make(5)
    epoch0_a, epoch0_b = _run(a, 0), _run(b, 0)
    assert epoch0_a == epoch0_b
    assert sorted(i for ids, _ in epoch0_a for i in ids) == list(range(20, 32))
    epoch1 = _run(a, 1)
    assert epoch1 != epoch0_a
    assert _run(b, 1) == epoch1
    assert _run(make(6), 0) != epoch0_a
    # resuming inside an epoch yields exactly the remaining batches, augmentation included
    assert _run(b, 1, skip=1) == epoch1[1:]
    # two processes split each step's images without overlap
    ranks = [TrainLoader(_RandomSizes(), _cfg(5, workers), rank=r, world=2) for r in (0, 1)]
    ids = [[i for ids_, _ in _run(r, 0) for i in ids_] for r in ranks]
    assert not set(ids[0]) & set(ids[1]) and len(ids[0]) == len(ids[1]) == 4
    assert derive_seed(5, 0, 0) != derive_seed(5, 1, 0) != derive_seed(5, 0, 1)


@pytest.mark.slow
def test_loader_with_worker_processes_is_deterministic_in_a_fresh_interpreter() -> None:
    """The same check with 2 DataLoader worker processes, run in a fresh interpreter: the
    workers are forked, and a fork copies any lock another thread of this test process
    (a server's event loop, a writer thread) happens to hold, which can hang the child."""
    here = Path(__file__).resolve()
    code = (f"import sys; sys.path[:0] = [{str(here.parent)!r}, {str(here.parents[2])!r}]; "
            "import test_data_augment as t; t.test_loader_is_deterministic_per_seed_and_epoch(2)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
