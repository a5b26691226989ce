"""Training and test-time geometry on sample dicts: shortest-edge resize and horizontal flip.

A sample dict holds ``image`` uint8 (3, H, W), ``boxes`` float32 (M, 4) XYXY in pixels of
``image``, optionally ``masks`` bool (M, H, W), and ``image_size`` (H, W). Every transform keeps
these in one frame: after a transform ``boxes``/``masks`` are in the frame of the new ``image``
(the network input frame, before padding); ``orig_size`` is left unchanged.

Randomness comes from the ``rng`` argument (``random.Random`` or ``torch.Generator``) or, if it
is None, from this module's generator, which :func:`seed_augmentations` reseeds; the data
training loader passes a generator seeded per (seed, epoch, sample) instead
(see :class:`training.data.loader.TrainLoader`).
Resize sizes follow detectron2's ``ResizeShortestEdge`` and reuse :mod:`serving.inference.transforms`, so
training and serving see the same geometry.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Protocol, Union

import torch
import torch.nn.functional as F

from serving.inference.transforms import resize_image, resized_shape

RandomSource = Union[random.Random, torch.Generator, None]
Sample = dict[str, Any]

_DEFAULT_RNG = random.Random(0)


def seed_augmentations(seed: int) -> None:
    """Reseed the generator used by transforms called without an ``rng``."""
    _DEFAULT_RNG.seed(seed)


def _uniform(rng: RandomSource) -> float:
    """One float in [0, 1)."""
    if isinstance(rng, torch.Generator):
        return float(torch.rand((), generator=rng).item())
    return (rng or _DEFAULT_RNG).random()


def _randint(rng: RandomSource, low: int, high: int) -> int:
    """One integer in [low, high] (both inclusive)."""
    if isinstance(rng, torch.Generator):
        return int(torch.randint(low, high + 1, (), generator=rng).item())
    return (rng or _DEFAULT_RNG).randint(low, high)


class Transform(Protocol):
    """A callable ``(sample, rng=None) -> sample``."""

    def __call__(self, sample: Sample, rng: RandomSource = None) -> Sample: ...


def resize_sample(sample: Sample, size: tuple[int, int]) -> Sample:
    """Resize ``sample`` to ``size`` = (h, w): image bilinear with antialiasing (rounded back to
    uint8), masks nearest-exact, boxes scaled by (w / W, h / H) per axis."""
    image = sample["image"]
    height, width = int(image.shape[-2]), int(image.shape[-1])
    out = dict(sample)
    out["image_size"] = (int(size[0]), int(size[1]))
    if (height, width) == tuple(size):
        return out
    out["image"] = resize_image(image, size).round_().to(torch.uint8)
    scale = torch.tensor([size[1] / width, size[0] / height] * 2, dtype=torch.float32)
    out["boxes"] = sample["boxes"].to(torch.float32) * scale
    masks = sample.get("masks")
    if masks is not None:
        if masks.shape[0] == 0:
            out["masks"] = masks.new_zeros((0, size[0], size[1]))
        else:
            resized = F.interpolate(masks[None].to(torch.uint8), size=size, mode="nearest-exact")
            out["masks"] = resized[0].bool()
    return out


class ResizeShortestEdge:
    """Resize so the shorter side is ``short`` unless the longer one would exceed ``max_size``.

    ``short`` is drawn per call from ``short_sizes``: ``sample="choice"`` picks one of them,
    ``"range"`` draws an integer in [min, max] (detectron2's semantics). One size is the
    test-time transform. New size: ``scale = short / min(H, W)``, if ``max(H, W) * scale >
    max_size`` then ``scale = max_size / max(H, W)``; ``(round(H * scale), round(W * scale))``.
    """

    def __init__(self, short_sizes: Sequence[int] | int, max_size: int,
                 sample: str = "choice") -> None:
        sizes = [int(short_sizes)] if isinstance(short_sizes, int) else [int(s) for s in
                                                                         short_sizes]
        if not sizes or min(sizes) <= 0 or max_size <= 0:
            raise ValueError(f"ResizeShortestEdge: sizes {sizes} and max_size {max_size} must be "
                             "positive")
        if sample not in ("choice", "range"):
            raise ValueError(f"ResizeShortestEdge: sample={sample!r}, use 'choice' or 'range'")
        if sample == "range" and len(sizes) != 2:
            raise ValueError("ResizeShortestEdge: sample='range' needs two sizes (min, max)")
        self.short_sizes = sizes
        self.max_size = int(max_size)
        self.sample = sample

    def output_size(self, height: int, width: int, rng: RandomSource = None) -> tuple[int, int]:
        """Draw a short side and return the new (h, w) for an (height, width) image."""
        if self.sample == "range":
            short = _randint(rng, min(self.short_sizes), max(self.short_sizes))
        elif len(self.short_sizes) == 1:
            short = self.short_sizes[0]
        else:
            short = self.short_sizes[_randint(rng, 0, len(self.short_sizes) - 1)]
        return resized_shape(height, width, short, self.max_size)

    def __call__(self, sample: Sample, rng: RandomSource = None) -> Sample:
        height, width = int(sample["image"].shape[-2]), int(sample["image"].shape[-1])
        return resize_sample(sample, self.output_size(height, width, rng))


def hflip_sample(sample: Sample) -> Sample:
    """Mirror image, masks and boxes left-right: ``x1' = W - x2``, ``x2' = W - x1``."""
    out = dict(sample)
    width = int(sample["image"].shape[-1])
    out["image"] = sample["image"].flip(-1)
    boxes = sample["boxes"]
    out["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0],
                                boxes[:, 3]], dim=1)
    if sample.get("masks") is not None:
        out["masks"] = sample["masks"].flip(-1)
    return out


class RandomHorizontalFlip:
    """Flip the sample left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomHorizontalFlip: p={p} must be in [0, 1]")
        self.p = float(p)

    def __call__(self, sample: Sample, rng: RandomSource = None) -> Sample:
        if self.p > 0 and _uniform(rng) < self.p:
            return hflip_sample(sample)
        return sample


class Compose:
    """Apply transforms in order, passing the same ``rng`` to each."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, rng: RandomSource = None) -> Sample:
        for t in self.transforms:
            sample = t(sample, rng)
        return sample


def train_transform(short_sizes: Sequence[int], max_size: int, flip_p: float = 0.5,
                    sample: str = "choice") -> Compose:
    """Multi-scale shortest-edge resize followed by a random horizontal flip."""
    return Compose([ResizeShortestEdge(short_sizes, max_size, sample),
                    RandomHorizontalFlip(flip_p)])


def eval_transform(short_size: int, max_size: int) -> Compose:
    """Fixed shortest-edge resize (the geometry serving uses)."""
    return Compose([ResizeShortestEdge([short_size], max_size)])
