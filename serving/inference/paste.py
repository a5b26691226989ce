"""Stride-4 mask probabilities -> boolean masks of the original image, stored as crops.

The masks are those of the pipeline of SIM_SPEC section 5, step 4: CondInst's aligned x4
upsampling of the padded input's probabilities, crop to the resized image, bilinear resize
(``align_corners=False``) to the original size, threshold; prompted masks are also zeroed
outside their box. Done for the whole image, that is several float copies of an (N, H0, W0)
array (12 GB of booleans alone for 256 masks of an 8000x6000 image, and most of the time
after the network). Here the threshold comes first and the floats are interpolated only
where they can matter:

1. *Groups.* Original pixel (y, x) is a convex combination of the stride-4 probabilities in
   rows ``ca(y)..cb(y) + 1`` and columns ``ca(x)..cb(x) + 1`` (``cb - ca <= 1``). Runs of
   pixels with the same ``ca`` form *groups* (4x4 pixel blocks at the same size, about
   4 x the upscale otherwise). For all masks at once (numpy, no float copy of the image): a
   group is certainly True when all its sources exceed the threshold by a margin, certainly
   False when none comes within it, and *mixed* otherwise (a mask's edge: ~1 % of groups).
2. *Edges.* Only the pixels of mixed groups are interpolated, a block per group by two small
   matrix products (the group's composed weights: within ~1e-7 of the kernel's value); the
   few within the margin of the threshold are recomputed with PyTorch's own index, weight
   and rounding (:mod:`serving.inference.bilinear`), so every pixel is decided as
   ``F.interpolate`` decides it, bit for bit.
3. *Crops.* Each mask's bounding box follows from its True groups and edge pixels (and its
   clip box); the crop is its True groups repeated to pixels (two ``np.take``, the cost of
   writing the crop once) with the edge pixels set. Small images (or masks that fill them)
   are expanded for all masks at once and the crops are views (at the network's input size,
   every group written as one 4-byte word: ``paste_groups.expand``).

Many masks of a large image are cut in chunks of masks on a few threads (``PARALLEL_PIXELS``).
The result is bit-identical to the whole-image computation (kept as the fallback, computed a
few masks at a time and cut to the mask's region): on other devices, when the CPU kernel's
operation order is not reproduced, and for maps small enough that PyTorch switches kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..masks import InstanceMasks, true_window
from ..model.ops import aligned_bilinear
from .bilinear import SMALL_OUTPUT, combine, cpu_fused, sample
from .paste_groups import (
    AxisGroups,
    axis_groups,
    block_starts,
    block_words,
    expand,
    group_maps,
    word_pixels,
)
from .workers import budget as workers_budget
from .workers import pool as worker_pool

#: Float intermediates of the whole-image fallback are kept below this many bytes per chunk
#: on the CPU (fresh allocations of tens of MB cost more in page faults than the arithmetic).
CPU_CHUNK_BYTES = 16 << 20
#: Bytes of full-size float masks per chunk of the fallback on other devices.
DEVICE_CHUNK_BYTES = 256 << 20
#: Masks x H x W up to which all masks of an image are expanded at once (crops are views of
#: the (K, H, W) array), and when it is at most DENSE_VIEW_RATIO times the crops' own bytes.
DENSE_VIEW_BYTES = 16 << 20
DENSE_VIEW_RATIO = 2
#: Pixels of edge groups interpolated per chunk (a few float32 / int64 copies of this).
EDGE_PIXELS = 1 << 18
#: Masks x pixels of an image from which its masks are cut in chunks side by side
#: (:mod:`.workers`; each mask is cut as it would be alone). 100 masks of 512 x 512 px: 20 %
#: less time on 2 threads; 100 of 256 x 256 px: 15 % more, the interpreter lock's share.
PARALLEL_PIXELS = 1 << 24
#: Sources beyond ``threshold +- MARGIN * max(1, |threshold|, |probs|)`` decide a pixel
#: without interpolating; interpolation rounding moves values by < 1e-6 of that scale.
MARGIN = 2.0 ** -16


def _values(probs: np.ndarray, k: np.ndarray, y: np.ndarray, x: np.ndarray, rows: AxisGroups,
            cols: AxisGroups, fused: bool) -> np.ndarray:
    """float32 values of the whole-image pipeline at pixels (y, x) of masks k (parallel 1-D
    int64 arrays) of ``probs`` (K, h4, w4) float32."""
    if rows.stage2 is None or cols.stage2 is None:
        return sample(probs, k, rows.stage1.take(y), cols.stage1.take(x), fused)
    r2, c2 = rows.stage2.take(y), cols.stage2.take(x)

    def up(ri: np.ndarray, ci: np.ndarray) -> np.ndarray:
        return sample(probs, k, rows.stage1.take(ri), cols.stage1.take(ci), fused)

    top = combine(up(r2.i0, c2.i0), c2.w0, up(r2.i0, c2.i1), c2.w1, fused)
    bottom = combine(up(r2.i1, c2.i0), c2.w0, up(r2.i1, c2.i1), c2.w1, fused)
    return combine(top, r2.w0, bottom, r2.w1, fused)


class _Plan(NamedTuple):
    """Step 1 for K masks: groups of both axes, (K, Gr, Gc) bool ``high`` (certainly True)
    and ``low`` (certainly False) groups, the (K,) clip ranges [y0, y1) x [x0, x1) and the
    threshold margin."""

    rows: AxisGroups
    cols: AxisGroups
    high: np.ndarray
    low: np.ndarray
    clip: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    margin: float
    boxed: bool


def _plan(probs: np.ndarray, resized: tuple[int, int], orig: tuple[int, int], threshold: float,
          boxes: np.ndarray | None, fused: bool, erode: bool = False) -> _Plan:
    """Step 1. ``erode``: "certainly False" only where the 3x3 stride-4 neighbourhood is too
    (robust to a sampling index off by one: the fallback's regions)."""
    (h4, w4), (rh, rw), (h0, w0) = probs.shape[1:], resized, orig
    same = (rh, rw) == (h0, w0)
    # not resized at all, or resized (both axes: an axis of equal size resizes exactly)
    rows = axis_groups(h4, rh, None if same else h0, fused)
    cols = axis_groups(w4, rw, None if same else w0, fused)
    scale = max(1.0, abs(threshold), float(probs.max(initial=0.0)),
                -float(probs.min(initial=0.0)))
    margin = MARGIN * scale
    # Few fresh arrays: after a pause a pass that writes memory not yet in the cache costs
    # several in-place passes, so the maps below are reused as they fall free.
    above = probs > threshold + margin
    below = probs <= threshold - margin
    if erode:
        for axis in (1, 2):
            src = below.copy()
            lead, lag = [slice(None)] * 3, [slice(None)] * 3
            lead[axis], lag[axis] = slice(1, None), slice(None, -1)
            below[tuple(lead)] &= src[tuple(lag)]
            below[tuple(lag)] &= src[tuple(lead)]
    # both maps in one byte: bit 0 "above", bit 1 "below"
    state = below.view(np.uint8)
    np.add(state, state, out=state)  # << 1 (numpy's byte shifts are not vectorised)
    state |= above.view(np.uint8)
    groups = group_maps(state, rows, cols, scratch=above.view(np.uint8))
    high = (groups & 1).view(bool)
    low = np.right_shift(groups, 1, out=groups).view(bool)
    k = len(probs)
    if boxes is None:
        clip = (np.zeros(k, np.int64), np.full(k, h0), np.zeros(k, np.int64), np.full(k, w0))
    else:  # the clip test of pixel centres, as float32 comparisons
        centres_y = np.arange(h0, dtype=np.float32) + np.float32(0.5)
        centres_x = np.arange(w0, dtype=np.float32) + np.float32(0.5)
        clip = (np.searchsorted(centres_y, boxes[:, 1], "left"),
                np.searchsorted(centres_y, boxes[:, 3], "right"),
                np.searchsorted(centres_x, boxes[:, 0], "left"),
                np.searchsorted(centres_x, boxes[:, 2], "right"))
    return _Plan(rows, cols, high, low, clip, margin, boxes is not None)


def _inside(plan: _Plan, groups: np.ndarray) -> np.ndarray:
    """``groups`` (K, Gr, Gc) bool restricted to the groups that meet each mask's clip box."""
    if not plan.boxed or groups.size == 0:
        return groups
    y0, y1, x0, x1 = plan.clip
    out = groups.copy()
    for axis, (lo, hi, g) in ((1, (y0, y1, plan.rows)), (2, (x0, x1, plan.cols))):
        n = len(g.of)
        first = g.of[np.minimum(lo, n - 1)]
        last = np.where(hi > lo, g.of[np.clip(hi - 1, 0, n - 1)], -1)
        index = np.arange(len(g.starts) - 1)
        keep = (index >= first[:, None]) & (index <= last[:, None])
        out &= keep[:, :, None] if axis == 1 else keep[:, None, :]
    return out


def _bounds(plan: _Plan, groups: np.ndarray) -> np.ndarray:
    """(K, 4) int64 pixel bounds y0, y1, x0, x1 of each mask's ``groups`` (K, Gr, Gc) bool,
    inside its clip box; y0 > y1 where it has none."""
    y0c, y1c, x0c, x1c = plan.clip
    out = np.empty((len(groups), 4), np.int64)
    for j, (g, lo, hi, axis) in enumerate(((plan.rows, y0c, y1c, 2), (plan.cols, x0c, x1c, 1))):
        any_ = _any_groups(groups, 3 - axis)  # (K, G)
        has = any_.any(axis=1)
        first = any_.argmax(axis=1)
        last = any_.shape[1] - 1 - any_[:, ::-1].argmax(axis=1)
        out[:, 2 * j] = np.where(has, np.maximum(g.starts[first], lo), np.iinfo(np.int64).max)
        out[:, 2 * j + 1] = np.where(has, np.minimum(g.starts[last + 1], hi), -1)
    return out


def _block_values(probs: np.ndarray, kk: np.ndarray, gr: np.ndarray, gc: np.ndarray,
                  rows: AxisGroups, cols: AxisGroups) -> np.ndarray:
    """(M, Lr, Lc) float32 values of groups (gr, gc) of masks kk of C-contiguous ``probs``,
    every pixel of a group from its 3x3 stride-4 patch by the groups' weights (within ~1e-7
    of the kernel's value, not bit for bit; :func:`_edge_chunk` recomputes the values that
    close to the threshold exactly). Blocks of two typical groups share their weights: two
    matrix products for all blocks, then two small ones for each other block."""
    h4, w4 = probs.shape[1:]
    starts = (kk * (h4 * w4))[:, None] + rows.patch[gr] * w4  # (M, 3) flat row starts
    patch = np.take(probs.reshape(-1), starts[:, :, None] + cols.patch[gc][:, None, :])
    # every block by the typical weights, then the others (few) by their own
    out = _shared_products(patch, rows.weights[rows.typical][0], cols.weights[cols.typical][0])
    rest = np.flatnonzero(~(rows.typical[gr] & cols.typical[gc]))
    if len(rest):
        out[rest] = np.matmul(np.matmul(rows.weights[gr[rest]], patch[rest]),
                              cols.weights[gc[rest]].transpose(0, 2, 1))
    return out


def _shared_products(patch: np.ndarray, row_weights: np.ndarray, col_weights: np.ndarray,
                     ) -> np.ndarray:
    """``row_weights @ patch[m] @ col_weights.T`` for every m of (M, 3, 3) ``patch``, by two
    matrix products over all blocks at once ((Lr, 3) and (Lc, 3) weights)."""
    m, lr, lc = len(patch), len(row_weights), len(col_weights)
    right = (patch.reshape(3 * m, 3) @ col_weights.T).reshape(m, 3, lc)
    left = row_weights @ right.transpose(1, 0, 2).reshape(3, m * lc)
    return left.reshape(lr, m, lc).transpose(1, 0, 2)


def _nonzero3(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``np.nonzero`` of a 3-D array (through the flat indices: faster)."""
    flat = np.flatnonzero(a)
    rest, last = np.divmod(flat, a.shape[2])
    first, middle = np.divmod(rest, a.shape[1])
    return first, middle, last


def _edges(plan: _Plan, probs: np.ndarray, threshold: float, fused: bool) -> list[_Edges]:
    """Step 2: the mixed groups inside the clip boxes, sorted by mask, with their pixels'
    values thresholded, in chunks of ``EDGE_PIXELS`` pixels (bounded memory: a byte per
    pixel of a mixed group is kept)."""
    # mixed: neither certainly True nor certainly False (never both: equal means neither)
    kk, gr, gc = _nonzero3(_inside(plan, np.equal(plan.high, plan.low)))
    step = max(1, EDGE_PIXELS // (plan.rows.pix.shape[1] * plan.cols.pix.shape[1]))
    return [_edge_chunk(plan, probs, threshold, fused, kk[a:a + step], gr[a:a + step],
                        gc[a:a + step]) for a in range(0, len(kk), step)]


def _widen(bounds: np.ndarray, edges: _Edges, plan: _Plan) -> None:
    """Grow the (K, 4) bounds y0, y1, x0, x1 in place to cover the True pixels of the mixed
    groups ``edges`` (sorted by mask): per group, its first and last True row and column
    (the pixels' extremes, without listing the pixels)."""
    rows_any, cols_any = _any_last(edges.true), edges.true.any(1)  # (M, Lr), (M, Lc)
    has = np.flatnonzero(_any_last(rows_any))
    if not len(has):
        return
    masks, at = _segments(edges.kk[has])
    for j, (axis, used, index) in enumerate(((plan.rows, rows_any, edges.gr),
                                             (plan.cols, cols_any, edges.gc))):
        groups = index[has]
        first, last = _first_last(used[has])
        first, last = axis.pix[groups, first], axis.pix[groups, last] + 1
        bounds[masks, 2 * j] = np.minimum(bounds[masks, 2 * j], np.minimum.reduceat(first, at))
        bounds[masks, 2 * j + 1] = np.maximum(bounds[masks, 2 * j + 1],
                                              np.maximum.reduceat(last, at))


def _first_last(used: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first and the last True index along the last axis of (n, L) bool ``used`` (every
    row has one). Where L is 4 (4-pixel groups), a row's bytes read as one word give a
    4-bit code (a multiply gathers the bytes' low bits) that indexes two tables: numpy's
    argmax runs row by row on so short an axis."""
    if used.shape[1] != 4:
        return used.argmax(1), used.shape[1] - 1 - used[:, ::-1].argmax(1)
    word = np.ascontiguousarray(used).view("<u4")[:, 0]
    code = (word * np.uint32(0x08040201)) >> np.uint32(24)  # bit 3 - i: slot i
    return _FIRST_OF_4[code], _LAST_OF_4[code]


#: First and last set slot of the 4-bit codes of :func:`_first_last` (0 for no slot).
_FIRST_OF_4, _LAST_OF_4 = (np.array([f([i for i in range(4) if code >> (3 - i) & 1] or [0])
                                     for code in range(16)]) for f in (min, max))


def _any_groups(groups: np.ndarray, keep: int) -> np.ndarray:
    """(K, G) bool: ``groups.any()`` of (K, Gr, Gc) bool over the axis other than ``keep``
    (1 or 2), as sums of bytes (einsum: 3-5x faster than numpy's ``any`` over these axes),
    at most 255 at a time so that a sum cannot wrap."""
    spec = "kij->ki" if keep == 1 else "kij->kj"
    bytes_ = groups.view(np.uint8)
    n = groups.shape[3 - keep]
    out = np.zeros((len(groups), groups.shape[keep]), bool)
    for start in range(0, n, 255):
        part = bytes_[:, start:start + 255] if keep == 2 else bytes_[:, :, start:start + 255]
        out |= np.einsum(spec, part) != 0
    return out


def _any_last(a: np.ndarray) -> np.ndarray:
    """``a.any(-1)`` of a bool array (numpy reduces a short last axis slowly, one small
    reduction per row): where that axis is contiguous and 1, 2, 4 or 8 long, its bytes are
    read as one word."""
    n = a.shape[-1]
    if n in (1, 2, 4, 8) and a.strides[-1] == 1:
        return a.view(f"u{n}")[..., 0] != 0
    return a.any(-1)


def _segments(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of sorted ``k`` and where each one's run starts."""
    starts = np.flatnonzero(np.diff(k, prepend=-1))
    return k[starts], starts


def _edge_chunk(plan: _Plan, probs: np.ndarray, threshold: float, fused: bool, kk: np.ndarray,
                gr: np.ndarray, gc: np.ndarray) -> _Edges:
    """:func:`_edges` for the groups (gr, gc) of masks kk."""
    rows, cols = plan.rows, plan.cols
    values = _block_values(probs, kk, gr, gc, rows, cols)
    row_ok, col_ok = rows.valid[gr], cols.valid[gc]  # (M, Lr), (M, Lc)
    if plan.boxed:
        y0c, y1c, x0c, x1c = plan.clip
        ys, xs = rows.pix[gr], cols.pix[gc]
        row_ok = row_ok & (ys >= y0c[kk, None]) & (ys < y1c[kk, None])
        col_ok = col_ok & (xs >= x0c[kk, None]) & (xs < x1c[kk, None])
    row_out, col_out = ~row_ok, ~col_ok  # the slots that are no pixel of the mask (few)
    t32 = np.float32(threshold)
    # The block values are within ~1e-7 * scale of the kernel's: those within the margin of
    # the threshold are recomputed in the kernel's own operation order. (In place where it
    # can be: on these few values a fresh array costs more than the arithmetic. The slots
    # outside are cleared by row and column: an (M, Lr, Lc) mask of another memory layout
    # than the values would make numpy loop over 4 elements at a time.)
    gap = np.subtract(values, t32)
    near = np.less_equal(np.abs(gap, out=gap), plan.margin)
    _clear(near, row_out, col_out)
    m, ly, lx = _nonzero3(near)
    values[m, ly, lx] = _values(probs, kk[m], rows.pix[gr[m], ly], cols.pix[gc[m], lx], rows,
                                cols, fused)
    true = np.greater(values, t32)
    _clear(true, row_out, col_out)
    return _Edges(kk, gr, gc, true)


def _clear(blocks: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> None:
    """Set False in place the rows ``rows`` (M, Lr) bool and the columns ``cols`` (M, Lc)
    bool of (M, Lr, Lc) bool ``blocks``."""
    blocks[rows] = False
    blocks.transpose(0, 2, 1)[cols] = False


class _Edges(NamedTuple):
    """Mixed groups (gr, gc) of masks kk (sorted) and their (M, Lr, Lc) bool pixels."""

    kk: np.ndarray
    gr: np.ndarray
    gc: np.ndarray
    true: np.ndarray

    def pixels(self, plan: _Plan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(k, y, x) int64 of the True pixels, sorted by k."""
        m, ly, lx = _nonzero3(self.true)
        return self.kk[m], plan.rows.pix[self.gr[m], ly], plan.cols.pix[self.gc[m], lx]

    def write_blocks(self, words: np.ndarray, dense: np.ndarray, plan: _Plan) -> None:
        """Write the groups' pixels into :func:`.paste_groups.block_words` ``words``
        (K, Gr, 4, Gc) uint32 (4 slots per group on both axes): a 4-byte word per block row
        for the groups that fill their block (:func:`.paste_groups.block_starts`; the groups
        are mixed, so their words hold no True pixel yet), then the True pixels of the
        others (a few at the axes' starts) into ``dense``, the words' pixel view."""
        fits = block_starts(plan.rows)[self.gr] & block_starts(plan.cols)[self.gc]
        a = np.flatnonzero(fits)
        block = np.ascontiguousarray(self.true[a]).view(np.uint32).reshape(len(a), 4)
        words[self.kk[a], self.gr[a], :, self.gc[a]] = block
        rest = np.flatnonzero(~fits)
        if len(rest):
            others = _Edges(self.kk[rest], self.gr[rest], self.gc[rest], self.true[rest])
            dense[others.pixels(plan)] = True


def _expand(high: np.ndarray, rows: AxisGroups, cols: AxisGroups, box: tuple[int, int, int, int],
            out: np.ndarray) -> None:
    """Step 3: write the crop ``box`` (y0, y1, x0, x1) of one mask's ``high`` groups (Gr, Gc)
    into ``out`` ((y1 - y0, x1 - x0) bool): columns on the group rows, then whole rows."""
    y0, y1, x0, x1 = box
    first, last = int(rows.of[y0]), int(rows.of[y1 - 1])
    part = np.take(high[first:last + 1], cols.of[x0:x1], axis=1)
    np.take(part, rows.of[y0:y1] - first, axis=0, out=out)


def _crops_exact(probs: np.ndarray, resized: tuple[int, int], orig: tuple[int, int],
                 threshold: float, boxes: np.ndarray | None, fused: bool,
                 image_masks: int | None = None) -> InstanceMasks:
    """Steps 1-3 (see the module docstring) for (K, h4, w4) float32 ``probs``; a chunk of an
    image's ``image_masks`` masks (default K) is written as the whole image would be."""
    plan = _plan(probs, resized, orig, threshold, boxes, fused)
    edges = _edges(plan, probs, threshold, fused)
    bounds = _bounds(plan, _inside(plan, plan.high))
    small = (image_masks or len(probs)) * orig[0] * orig[1] <= DENSE_VIEW_BYTES
    kept: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def edge_pixels() -> Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The True edge pixels as (k, y, x) lists (24 bytes each), only where they are
        written one by one: kept once listed for small images, listed again from each
        chunk's booleans (1 byte per pixel) for large ones, to bound memory."""
        if not small:
            return (chunk.pixels(plan) for chunk in edges)
        if not kept:
            kept.extend(chunk.pixels(plan) for chunk in edges)
        return kept

    for chunk in edges:
        _widen(bounds, chunk, plan)
    sizes = np.maximum(bounds[:, 1] - bounds[:, 0], 0) * np.maximum(bounds[:, 3] - bounds[:, 2], 0)
    total = int(sizes.sum())
    if small or len(probs) * orig[0] * orig[1] <= DENSE_VIEW_RATIO * total:
        # Small images, or masks that fill them: all masks expanded at once, each crop a
        # view of its mask.
        dense = _dense(plan, edges, edge_pixels)
        crops = [dense[k, y0:y1, x0:x1] if sizes[k] else np.zeros((0, 0), bool)
                 for k, (y0, y1, x0, x1) in enumerate(bounds.tolist())]
        offsets = np.where(sizes[:, None] > 0, bounds[:, [0, 2]], 0)
        return InstanceMasks(crops, offsets, orig)
    # One buffer for all crops (views into it): one large allocation instead of page faults
    # in a fresh one per mask.
    buffer = np.empty(total, bool)
    ends = np.cumsum(sizes).tolist()
    crops = [np.zeros((0, 0), bool)] * len(probs)
    for k, box in enumerate(bounds.tolist()):
        if sizes[k]:
            crops[k] = buffer[ends[k] - int(sizes[k]):ends[k]].reshape(box[1] - box[0],
                                                                      box[3] - box[2])
            _expand(plan.high[k], plan.rows, plan.cols, box, crops[k])
    for ek, ey, ex in edge_pixels():
        masks, at = _segments(ek)
        for k, s, e in zip(masks.tolist(), at.tolist(), [*at[1:].tolist(), len(ek)]):
            crops[k][ey[s:e] - bounds[k, 0], ex[s:e] - bounds[k, 2]] = True
    offsets = np.where(sizes[:, None] > 0, bounds[:, [0, 2]], 0)
    return InstanceMasks(crops, offsets, orig)


def _dense(plan: _Plan, edges: list[_Edges],
           edge_pixels: Callable[[], Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]],
           ) -> np.ndarray:
    """(K, H0, W0) bool: every mask at full size, its certainly True groups expanded
    (:func:`.paste_groups.expand`) and its edge pixels set (``edge_pixels()``: the chunks'
    True pixels); where the groups are 4x4 pixel blocks, most edge groups are written as
    whole block words instead (no scatter of their pixels: 4-7 % less time for 100 masks at
    256-512 px)."""
    words = block_words(plan.high, plan.rows, plan.cols)
    if words is None:
        dense = expand(plan.high, plan.rows, plan.cols)
    else:
        dense = word_pixels(words, plan.rows, plan.cols)
        if plan.rows.pix.shape[1] == plan.cols.pix.shape[1] == 4:
            for chunk in edges:
                chunk.write_blocks(words, dense, plan)
            return dense
    for pixels in edge_pixels():
        dense[pixels] = True
    return dense


def _crops_parallel(probs: np.ndarray, resized: tuple[int, int], orig: tuple[int, int],
                    threshold: float, boxes: np.ndarray | None, fused: bool) -> InstanceMasks:
    """:func:`_crops_exact`, for many masks of a large image in chunks of masks on a few
    threads (``PARALLEL_PIXELS``, :mod:`.workers`): the same masks, in order, written as one
    chunk would write them."""
    workers = min(workers_budget(), len(probs))
    if workers < 2 or len(probs) * orig[0] * orig[1] < PARALLEL_PIXELS:
        return _crops_exact(probs, resized, orig, threshold, boxes, fused)
    cuts = np.linspace(0, len(probs), workers + 1).round().astype(int).tolist()

    def part(index: int) -> InstanceMasks:
        a, b = cuts[index], cuts[index + 1]
        return _crops_exact(probs[a:b], resized, orig, threshold,
                            None if boxes is None else boxes[a:b], fused, len(probs))

    return InstanceMasks.concatenate(list(worker_pool(workers).map(part, range(workers))))


def _dense_chunk(probs: Tensor, resized: tuple[int, int], orig: tuple[int, int],
                 threshold: float) -> Tensor:
    """(n, h0, w0) bool full-size masks of (n, h4, w4) ``probs`` on their device: the
    whole-image pipeline (the fallback, and the definition the crops reproduce)."""
    probs = probs[:, None].float()
    if tuple(resized) == tuple(orig):  # same size: threshold at stride 1, then shift (exact)
        out = torch.empty((probs.shape[0], *orig), dtype=torch.bool, device=probs.device)
        _upsample4_threshold_into(out, probs, threshold)
        return out
    part = aligned_bilinear(probs, 4)[:, :, : resized[0], : resized[1]]
    part = F.interpolate(part, size=tuple(orig), mode="bilinear", align_corners=False)
    return part[:, 0] > threshold


def _crops_dense(mask_probs: Tensor, resized: tuple[int, int], orig: tuple[int, int],
                 threshold: float, boxes: np.ndarray | None) -> InstanceMasks:
    """Each mask that may have a True pixel at full size, a few at a time, cut to its region
    (its not-certainly-False groups inside its clip box, plus 2 pixels of slack)."""
    probs = mask_probs.detach().float().cpu().numpy()
    plan = _plan(probs, resized, orig, threshold, boxes, True, erode=True)
    bounds = _bounds(plan, _inside(plan, ~plan.low))
    h0, w0 = orig
    y0c, y1c, x0c, x1c = plan.clip
    regions = []
    for k, (y0, y1, x0, x1) in enumerate(bounds.tolist()):
        live = y0 < y1 and x0 < x1
        regions.append((max(y0 - 2, int(y0c[k])), min(y1 + 2, int(y1c[k])),
                        max(x0 - 2, int(x0c[k])), min(x1 + 2, int(x1c[k]))) if live else None)
    live = [k for k, r in enumerate(regions) if r is not None]
    h4, w4 = mask_probs.shape[-2:]
    per_mask = 4 * ((4 * h4 + 3) * (4 * w4 + 3) + h0 * w0)
    budget = CPU_CHUNK_BYTES if mask_probs.device.type == "cpu" else DEVICE_CHUNK_BYTES
    step = max(1, budget // per_mask)
    crops = [np.zeros((0, 0), bool)] * len(regions)
    for start in range(0, len(live), step):
        idx = live[start:start + step]
        for k, mask in zip(idx, _dense_chunk(mask_probs[idx], resized, orig, threshold)):
            y0, y1, x0, x1 = regions[k]  # type: ignore[misc]
            crops[k] = mask[y0:y1, x0:x1].cpu().numpy()
    return _tighten(crops, regions, orig)


def mask_crops(mask_probs: Tensor, resized_size: tuple[int, int], orig_size: tuple[int, int],
               threshold: float = 0.5, clip_boxes: Tensor | np.ndarray | None = None,
               ) -> InstanceMasks:
    """Stride-4 mask probabilities of the padded input -> masks of the original image, as
    tight crops (see the module docstring; bit for bit the masks of the whole-image
    pipeline, ``_dense_chunk``).

    Args:
        mask_probs: (K, H/4, W/4) float probabilities (any device).
        resized_size: (h, w) of the resized image inside the padded input.
        orig_size: (H0, W0) of the original image.
        threshold: probability threshold (a pixel is True when strictly above it).
        clip_boxes: optional (K, 4) XYXY boxes in original pixels (cast to float32); pixels
            whose centre lies outside a mask's box are False.

    Returns:
        :class:`serving.masks.InstanceMasks` of K masks of (H0, W0).
    """
    orig = (int(orig_size[0]), int(orig_size[1]))
    resized = (int(resized_size[0]), int(resized_size[1]))
    boxes = None
    if clip_boxes is not None:
        boxes = torch.as_tensor(clip_boxes).float().cpu().numpy().reshape(-1, 4)
        if len(boxes) != len(mask_probs):
            raise ValueError(f"clip_boxes: {len(boxes)} boxes for {len(mask_probs)} masks; "
                             "give one box per mask")
    if not len(mask_probs):
        return InstanceMasks([], np.zeros((0, 2), np.int64), orig)
    h4, w4 = (int(v) for v in mask_probs.shape[-2:])
    same = resized == orig
    fused = cpu_fused() if mask_probs.device.type == "cpu" else None
    if fused is not None and 4 * (h4 + w4) + 2 > SMALL_OUTPUT and (
            same or sum(orig) > SMALL_OUTPUT):
        probs = np.ascontiguousarray(mask_probs.detach().float().numpy())
        return _crops_parallel(probs, resized, orig, float(threshold), boxes, fused)
    return _crops_dense(mask_probs, resized, orig, float(threshold), boxes)


def _tighten(crops: list[np.ndarray], regions: list[tuple[int, int, int, int] | None],
             size: tuple[int, int]) -> InstanceMasks:
    """Cut each region's crop to the bounding box of its True pixels."""
    out, offsets = [], []
    for crop, region in zip(crops, regions):
        window = true_window(crop) if region is not None else None
        if window is None:
            out.append(np.zeros((0, 0), bool))
            offsets.append((0, 0))
            continue
        out.append(crop[window].copy())
        offsets.append((region[0] + window[0].start, region[2] + window[1].start))  # type: ignore[index]
    return InstanceMasks(out, offsets, size)


def _upsample4_threshold_into(out: Tensor, probs: Tensor, threshold: float) -> None:
    """``out[...] = aligned_bilinear(probs, 4)[:, 0, :h, :w] > threshold`` for out (n, h, w).

    :func:`aligned_bilinear` interpolates to (4h'+1, 4w'+1), replicate-pads two rows and
    columns at the top and left and crops, so output pixel (i, j) is the interpolated value at
    (max(i - 2, 0), max(j - 2, 0)). Thresholding commutes with that copy, so this thresholds
    the interpolated map once and shifts the booleans: the same masks without the float pad
    copy and the identity resize (a quarter of the memory traffic).
    """
    h, w = out.shape[-2:]
    x = F.pad(probs, (0, 1, 0, 1), mode="replicate")
    size = (4 * probs.shape[-2] + 1, 4 * probs.shape[-1] + 1)
    above = F.interpolate(x, size=size, mode="bilinear", align_corners=True)[:, 0] > threshold
    a, b = min(2, h), min(2, w)
    out[:, a:, b:] = above[:, : h - a, : w - b]
    out[:, :a, b:] = above[:, :1, : w - b]
    out[:, a:, :b] = above[:, : h - a, :1]
    out[:, :a, :b] = above[:, :1, :1]
