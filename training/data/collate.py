"""Batching samples into padded tensors, and the seeds of the data stream.

Padding follows the project conventions: images zero-padded at the bottom/right to multiples
of 32, ``valid`` marks the real pixels. Boxes and masks in a :class:`Batch` are in the network
input frame (resized, before padding -- padding only adds pixels after the image, so the same
coordinates hold in the padded frame).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from serving.inference.transforms import SIZE_DIVISIBILITY, pad_batch



@dataclass
class Batch:
    """A padded batch of B samples.

    Attributes:
        images: uint8 (B, 3, H, W) RGB, zero-padded; H, W multiples of ``size_divisibility``.
        valid: bool (B, H, W), True on real image pixels.
        boxes: B tensors float32 (M_i, 4), XYXY pixels of the input frame.
        labels: B tensors int64 (M_i,), contiguous class indices 0..C-1.
        masks: B tensors bool (M_i, H, W) padded like ``images``, or None (box mode).
        image_ids: COCO image ids.
        orig_sizes: (h, w) of each original image.
        image_sizes: (h, w) of each resized image before padding.
    """

    images: Tensor
    valid: Tensor
    boxes: list[Tensor]
    labels: list[Tensor]
    masks: list[Tensor] | None
    image_ids: list[int]
    orig_sizes: list[tuple[int, int]]
    image_sizes: list[tuple[int, int]]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with every tensor moved to ``device``."""
        def move(t: Tensor) -> Tensor:
            return t.to(device, non_blocking=non_blocking)

        return Batch(
            images=move(self.images), valid=move(self.valid),
            boxes=[move(b) for b in self.boxes], labels=[move(lb) for lb in self.labels],
            masks=None if self.masks is None else [move(m) for m in self.masks],
            image_ids=list(self.image_ids), orig_sizes=list(self.orig_sizes),
            image_sizes=list(self.image_sizes))

    def pin_memory(self) -> Batch:
        """A copy in pinned host memory (called by ``DataLoader(pin_memory=True)``)."""
        return Batch(
            images=self.images.pin_memory(), valid=self.valid.pin_memory(),
            boxes=[b.pin_memory() for b in self.boxes],
            labels=[lb.pin_memory() for lb in self.labels],
            masks=None if self.masks is None else [m.pin_memory() for m in self.masks],
            image_ids=list(self.image_ids), orig_sizes=list(self.orig_sizes),
            image_sizes=list(self.image_sizes))


def collate(samples: Sequence[dict[str, Any]], size_divisibility: int = SIZE_DIVISIBILITY
            ) -> Batch:
    """Pad sample dicts (see :class:`training.data.coco_dataset.CocoInstanceDataset`) into a Batch."""
    if not samples:
        raise ValueError("collate: got an empty list of samples")
    has_masks = [s.get("masks") is not None for s in samples]
    if any(has_masks) and not all(has_masks):
        raise ValueError("collate: some samples have masks and others do not")
    images, valid = pad_batch([s["image"] for s in samples], size_divisibility)
    masks = None
    if all(has_masks):
        masks = []
        for s in samples:
            m = s["masks"]
            padded = torch.zeros((m.shape[0], *images.shape[-2:]), dtype=torch.bool)
            padded[:, : m.shape[-2], : m.shape[-1]] = m
            masks.append(padded)
    return Batch(
        images=images, valid=valid,
        boxes=[s["boxes"].to(torch.float32) for s in samples],
        labels=[s["labels"].to(torch.int64) for s in samples],
        masks=masks,
        image_ids=[int(s["image_id"]) for s in samples],
        orig_sizes=[tuple(int(v) for v in s["orig_size"]) for s in samples],
        image_sizes=[(int(s["image"].shape[-2]), int(s["image"].shape[-1])) for s in samples])


def derive_seed(seed: int, epoch: int, worker_id: int) -> int:
    """A 32-bit seed that depends on (base seed, epoch, worker id) and nothing else."""
    mask = (1 << 64) - 1
    seq = np.random.SeedSequence([seed & mask, epoch & mask, worker_id & mask])
    return int(seq.generate_state(1, dtype=np.uint32)[0])
