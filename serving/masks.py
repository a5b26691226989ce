"""``InstanceMasks``: the boolean masks of one image, each stored as the crop of its extent.

A full-size mask of an 8000x6000 image is 48 MB; 256 of them are 12 GB, although each mask
covers a small part of the image (a prompted mask never leaves its box). Here instance ``i``
is the (h_i, w_i) bool crop of its own bounding box, placed at ``offsets[i] = (y0, x0)`` in
the (H, W) image; every pixel outside the crop is False. Memory is the sum of the crops'
areas in bytes. Full masks are built one instance at a time (:meth:`InstanceMasks.mask`) or
all at once only when asked (:meth:`InstanceMasks.dense`); COCO RLE is encoded from the crop
without building the full mask.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

#: A mask covering less than this fraction of its box counts as empty (``sim label`` flags
#: it ``sim_empty``; the per-box scale falls back for it, :mod:`serving.inference.box_scale`).
EMPTY_FRACTION = 0.05


def is_empty(area: int, box: Iterable[float]) -> bool:
    """Whether a mask of ``area`` pixels is empty or near-empty for its XYXY ``box``."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return area < max(1.0, EMPTY_FRACTION * max(x2 - x1, 0.0) * max(y2 - y1, 0.0))


def outline(mask: np.ndarray) -> np.ndarray:
    """(h, w) bool: the pixels of a 2-D bool ``mask`` with a 4-neighbour outside it (outside
    the array counts as outside the mask): the mask's own border."""
    inner = np.zeros_like(mask, dtype=bool)  # a pixel on the array's edge is never inner
    inner[1:-1, 1:-1] = mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    return mask & ~inner


def true_window(mask: np.ndarray) -> tuple[slice, slice] | None:
    """The (rows, columns) slices of the bounding box of a 2-D bool array's True pixels,
    ``None`` when it has none."""
    rows = np.flatnonzero(mask.any(axis=1))
    if not rows.size:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def _tight(mask: np.ndarray) -> tuple[int, int, np.ndarray]:
    """(y0, x0, crop) of a 2-D bool array cut to the bounding box of its True pixels
    ((0, 0) crop at (0, 0) when it has none)."""
    window = true_window(mask)
    if window is None:
        return 0, 0, np.zeros((0, 0), bool)
    return window[0].start, window[1].start, mask[window]


class InstanceMasks:
    """N boolean masks of an (H, W) image, each kept as the crop of its bounding box.

    Attributes:
        crops: N (h_i, w_i) bool arrays; pixel (r, c) of crop i is image pixel
            (y0_i + r, x0_i + c).
        offsets: (N, 2) int64 (y0, x0) of each crop's top-left pixel in the image.
        image_size: (H, W) of the image.
    """

    __slots__ = ("crops", "offsets", "image_size")

    def __init__(self, crops: Sequence[np.ndarray], offsets: Any,
                 image_size: tuple[int, int]) -> None:
        h, w = (int(v) for v in image_size)
        self.image_size = (h, w)
        self.crops = tuple(np.asarray(c, dtype=bool) for c in crops)
        self.offsets = np.asarray(offsets, dtype=np.int64).reshape(len(self.crops), 2)
        shapes = np.array([c.shape if c.ndim == 2 else (-1, -1) for c in self.crops],
                          np.int64).reshape(-1, 2)
        ends = self.offsets + shapes
        bad = np.flatnonzero((shapes < 0).any(axis=1) | (self.offsets < 0).any(axis=1)
                             | (ends[:, 0] > h) | (ends[:, 1] > w))
        if len(bad):
            i = int(bad[0])
            y0, x0 = (int(v) for v in self.offsets[i])
            raise ValueError(f"mask {i}: crop {self.crops[i].shape} at ({y0}, {x0}) does not "
                             f"fit in a {h}x{w} image")

    @classmethod
    def from_dense(cls, masks: np.ndarray, origin: tuple[int, int] | None = None,
                   image_size: tuple[int, int] | None = None) -> InstanceMasks:
        """From (N, h, w) bool masks, each cut to the bounding box of its True pixels.

        By default the masks are the whole image; given ``origin`` (y0, x0) and
        ``image_size`` (H, W), they cover the window of an (H, W) image whose top-left
        pixel is ``origin`` (a mask with no True pixel is kept as a (0, 0) crop at (0, 0)).
        """
        masks = np.asarray(masks)
        if masks.ndim != 3:
            raise ValueError(f"masks: expected (N, H, W), got shape {masks.shape}")
        parts = [_tight(m.astype(bool, copy=False)) for m in masks]
        y, x = origin or (0, 0)
        offsets = [(p[0] + y, p[1] + x) if p[2].size else (0, 0) for p in parts]
        return cls([p[2] for p in parts], offsets, image_size or masks.shape[1:])

    @classmethod
    def concatenate(cls, parts: Sequence[InstanceMasks]) -> InstanceMasks:
        """The instances of ``parts`` (all of one image size), in order."""
        if not parts:
            raise ValueError("concatenate needs at least one InstanceMasks")
        size = parts[0].image_size
        if any(p.image_size != size for p in parts):
            raise ValueError(f"image sizes differ: {[p.image_size for p in parts]}")
        return cls([c for p in parts for c in p.crops],
                   np.concatenate([p.offsets for p in parts]).reshape(-1, 2), size)

    def __len__(self) -> int:
        return len(self.crops)

    def __repr__(self) -> str:
        return (f"InstanceMasks({len(self)} masks of {self.image_size[0]}x{self.image_size[1]},"
                f" {self.nbytes} bytes of crops)")

    @property
    def nbytes(self) -> int:
        """Bytes held by the crops."""
        return sum(c.nbytes for c in self.crops)

    def select(self, index: Any) -> InstanceMasks:
        """The instances picked by ``index`` (a slice, int indices or an (N,) bool mask), as
        numpy indexing of the first axis would pick them."""
        picked = np.arange(len(self))[index]
        return InstanceMasks([self.crops[i] for i in np.atleast_1d(picked)],
                             self.offsets[np.atleast_1d(picked)], self.image_size)

    def box(self, i: int) -> tuple[int, int, int, int]:
        """(y0, x0, y1, x1): the image rows y0..y1-1 and columns x0..x1-1 crop i covers."""
        y0, x0 = (int(v) for v in self.offsets[i])
        h, w = self.crops[i].shape
        return y0, x0, y0 + h, x0 + w

    def mask(self, i: int) -> np.ndarray:
        """(H, W) bool: instance i at full size (H x W bytes)."""
        out = np.zeros(self.image_size, bool)
        y0, x0, y1, x1 = self.box(i)
        out[y0:y1, x0:x1] = self.crops[i]
        return out

    def dense(self) -> np.ndarray:
        """(N, H, W) bool: every instance at full size (N x H x W bytes)."""
        out = np.zeros((len(self), *self.image_size), bool)
        for i, crop in enumerate(self.crops):
            y0, x0, y1, x1 = self.box(i)
            out[i, y0:y1, x0:x1] = crop
        return out

    def areas(self) -> np.ndarray:
        """(N,) int64 mask areas in pixels."""
        return np.array([np.count_nonzero(c) for c in self.crops], dtype=np.int64)

    def rle_counts(self, i: int) -> list[int]:
        """Uncompressed COCO RLE counts of instance i: run lengths of the column-major (Fortran
        order) full mask, starting with a run of False (0 long when pixel (0, 0) is True)."""
        h, w = self.image_size
        y0, x0 = (int(v) for v in self.offsets[i])
        crop = self.crops[i]
        ch = crop.shape[0]
        # runs of True inside each crop column: +1 starts, -1 ends (exclusive), column-major
        edges = np.diff(np.pad(crop.T.astype(np.int8), ((0, 0), (1, 1))), axis=1)
        col_s, row_s = np.nonzero(edges == 1)
        col_e, row_e = np.nonzero(edges == -1)
        starts = (x0 + col_s) * h + y0 + row_s  # flat Fortran index in the image
        ends = (x0 + col_e) * h + y0 + row_e
        if ch and starts.size:  # a run ending at the image bottom continues at the next top
            joined = ends[:-1] == starts[1:]
            starts = starts[np.concatenate(([True], ~joined))]
            ends = ends[np.concatenate((~joined, [True]))]
        bounds = np.empty(2 * starts.size + 2, dtype=np.int64)
        bounds[0], bounds[-1] = 0, h * w
        bounds[1:-1:2], bounds[2:-1:2] = starts, ends
        counts = np.diff(bounds)
        if counts.size > 1 and counts[-1] == 0:  # the mask ends on a True pixel
            counts = counts[:-1]
        return counts.tolist()

    def rle(self, i: int) -> dict[str, Any]:
        """Compressed COCO RLE of instance i (``{"size": [H, W], "counts": bytes}``), exactly
        what ``pycocotools.mask.encode`` gives for the full mask. Needs pycocotools."""
        from pycocotools import mask as mask_util  # lazy: only RLE output needs it

        h, w = self.image_size
        return mask_util.frPyObjects({"size": [h, w], "counts": self.rle_counts(i)}, h, w)
