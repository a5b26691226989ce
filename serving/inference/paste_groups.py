"""The groups of :mod:`serving.inference.paste`: along one axis of the original image, runs of
pixels that read the same stride-4 cells, with the tables that interpolate them and spread
per-group values to pixels (see that module's docstring, step 1)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from .bilinear import Axis, aligned_axis, resize_axis

#: Runs (first pixel, end pixel, first slot): see ``AxisGroups.runs``.
Runs = tuple[tuple[int, int, int], ...]


class AxisGroups(NamedTuple):
    """One axis of the original image: its pixels in runs ("groups") that read the same
    cells, and per group the tables that interpolate its pixels as one block.

    Attributes:
        starts: (G + 1,) int64 first pixel of each group, then the axis length.
        ca, cb: (G,) int64 first and last cell that the group's pixels read (``cb - ca <= 1``;
            the groups are runs of one ``ca``, cut to at most 4 pixels or the usual run).
        of: (n,) int64 group of each pixel.
        stage1: aligned x4 sampling of the resized axis (into the stride-4 map).
        stage2: resize sampling of the original axis (into the resized one), ``None`` when
            the image was not resized.
        pix, valid: (G, L) int64 pixels of each group (L = the longest group) and which
            slots are real.
        patch: (G, 3) int64 stride-4 indices ca, ca + 1, ca + 2 (clamped): every source.
        weights: (G, L, 3) float32: pixel ``pix[g, l]`` is ``weights[g, l] @ patch[g]`` (both
            stages composed in float64, rounded once; within ~1e-7 of the kernel's value).
        runs: how :func:`spread` writes the axis (groups of at most 4 pixels, as at the
            network's input size): runs (first pixel, end pixel, first slot) of pixels that
            are consecutive slots when every group is written 4 times; ``None`` for longer
            groups or more than 8 runs.
        typical: (G,) bool: the groups whose ``weights`` are the axis's most common table
            (``weights[typical]`` all equal; at the input size all groups but a few at the
            ends), interpolated together by two plain matrix products (``paste._block_values``).
        shift: when every pixel ``i`` reads the same cells as group ``(i + shift) // 4``
            (4-pixel groups, as at the network's input size), so that repeating every group
            4 times and skipping ``shift`` pixels gives the axis (:func:`expand`); else
            ``None``.
    """

    starts: np.ndarray
    ca: np.ndarray
    cb: np.ndarray
    of: np.ndarray
    stage1: Axis
    stage2: Axis | None
    pix: np.ndarray
    valid: np.ndarray
    patch: np.ndarray
    weights: np.ndarray
    runs: Runs | None
    typical: np.ndarray
    shift: int | None


def _split(starts: np.ndarray) -> np.ndarray:
    """Group starts with runs longer than the most common length (at least 4) cut into
    pieces of it (same-size masks: 4x4 pixel blocks)."""
    lengths = np.diff(starts)
    cap = max(4, int(np.bincount(lengths).argmax()))
    pieces = -(-lengths // cap)
    first = np.repeat(np.cumsum(pieces) - pieces, pieces)
    cut = np.repeat(starts[:-1], pieces) + cap * (np.arange(int(pieces.sum())) - first)
    return np.concatenate((cut, starts[-1:]))


@functools.lru_cache(maxsize=16)
def axis_groups(n4: int, resized: int, size: int | None, fused: bool) -> AxisGroups:
    """The groups of an axis of ``size`` original pixels (``None``: the image was not
    resized), ``resized`` in the network input and ``n4`` at stride 4; ``fused``: the CPU
    kernel's variant. Cached (the arrays are made read-only)."""
    stage1 = aligned_axis(n4, resized)
    stage2 = None if size is None else resize_axis(resized, size, fused)
    size = resized if size is None else size
    u0, u1 = (stage2.i0, stage2.i1) if stage2 is not None else (np.arange(size),) * 2
    ca, cb = stage1.i0[u0], stage1.i0[u1]  # both non-decreasing
    change = np.flatnonzero(ca[1:] != ca[:-1]) + 1
    starts = _split(np.concatenate(([0], change, [size])).astype(np.int64))
    lengths = np.diff(starts)
    of = np.repeat(np.arange(len(lengths)), lengths)
    first = starts[:-1]
    pix = first[:, None] + np.arange(int(lengths.max()))
    valid = pix < starts[1:, None]
    pix = np.minimum(pix, size - 1)
    ca, cb = ca[first], cb[starts[1:] - 1]
    patch = np.minimum(ca[:, None] + np.arange(3), n4 - 1)
    weights = _weights(stage1, ca, first, pix, resized, stage2)
    out = AxisGroups(starts, ca, cb, of, stage1, stage2, pix, valid, patch, weights,
                     _runs(starts, of), _typical(weights), _shift(ca, cb, of))
    for field in out:
        for array in (field if isinstance(field, Axis) else [field]):
            if isinstance(array, np.ndarray):
                array.setflags(write=False)
    return out


def _weights(stage1: Axis, ca: np.ndarray, first: np.ndarray, pix: np.ndarray, resized: int,
             stage2: Axis | None) -> np.ndarray:
    """(G, L, 3) float32 weights of each group's pixels ``pix`` (G, L) on its three stride-4
    cells ``ca .. ca + 2``: the stage-1 sampling of the resized positions, composed (float64)
    with the stage-2 sampling of the original pixels when the image was resized."""
    def scatter(ax: Axis, base: np.ndarray, width: int) -> np.ndarray:
        out = np.zeros((*ax.i0.shape, width))
        at = np.indices(ax.i0.shape)
        for index, weight in ((ax.i0, ax.w0), (ax.i1, ax.w1)):
            np.add.at(out, (*at, np.clip(index - base[:, None], 0, width - 1)), weight)
        return out

    if stage2 is None:
        return scatter(stage1.take(pix), ca, 3).astype(np.float32)
    ua = stage2.i0[first]
    span = int((stage2.i1[pix] - ua[:, None]).max()) + 1
    upos = np.minimum(ua[:, None] + np.arange(span), resized - 1)
    return (scatter(stage2.take(pix), ua, span) @ scatter(stage1.take(upos), ca, 3)
            ).astype(np.float32)


def _runs(starts: np.ndarray, of: np.ndarray) -> Runs | None:
    """See ``AxisGroups.runs``."""
    if int(np.diff(starts).max()) > 4:
        return None
    slot = 4 * of + (np.arange(len(of)) - starts[of])
    cuts = np.concatenate(([0], np.flatnonzero(np.diff(slot) != 1) + 1, [len(of)]))
    if len(cuts) > 9:
        return None
    return tuple((int(a), int(b), int(slot[a])) for a, b in zip(cuts[:-1], cuts[1:]))


def _typical(weights: np.ndarray) -> np.ndarray:
    """See ``AxisGroups.typical``."""
    tables, which = np.unique(weights.reshape(len(weights), -1), axis=0, return_inverse=True)
    return which.ravel() == np.bincount(which.ravel(), minlength=len(tables)).argmax()


def _shift(ca: np.ndarray, cb: np.ndarray, of: np.ndarray) -> int | None:
    """See ``AxisGroups.shift``."""
    for shift in range(4):
        same = (np.arange(len(of)) + shift) // 4
        if same[-1] < len(ca) and np.array_equal(ca[same], ca[of]) and np.array_equal(
                cb[same], cb[of]):
            return shift
    return None


def expand(groups: np.ndarray, rows: AxisGroups, cols: AxisGroups) -> np.ndarray:
    """(K, n_rows, n_cols) bool: (K, Gr, Gc) bool ``groups`` repeated to their pixels on both
    axes, ``np.take(np.take(groups, cols.of, axis=2), rows.of, axis=1)``; through
    :func:`block_words` where both axes have a ``shift`` (15-25 % less time than the two
    gathers in place: the light heads at 256 px, 100 masks)."""
    words = block_words(groups, rows, cols)
    if words is None:
        return np.take(spread(groups, cols), rows.of, axis=1)
    return word_pixels(words, rows, cols)


def block_words(groups: np.ndarray, rows: AxisGroups, cols: AxisGroups) -> np.ndarray | None:
    """(K, Gr, 4, Gc) uint32: where both axes have a ``shift`` (4-pixel groups), each group
    of (K, Gr, Gc) bool ``groups`` as one 4-byte word (a multiply by 0x01010101) on each of
    its 4 rows, written by one broadcast multiply; ``None`` otherwise. Seen as bytes, it is
    the groups expanded to 4x4 pixel blocks (:func:`word_pixels`)."""
    if rows.shift is None or cols.shift is None:
        return None
    k, gr, gc = groups.shape
    words = np.empty((k, gr, 4, gc), np.uint32)
    # the multiply writes its broadcast result in place (no (K, Gr, Gc) word temporary)
    np.multiply(groups.view(np.uint8)[:, :, None], np.uint32(0x01010101), out=words,
                dtype=np.uint32)
    return words


def word_pixels(words: np.ndarray, rows: AxisGroups, cols: AxisGroups) -> np.ndarray:
    """(K, n_rows, n_cols) bool view of :func:`block_words` ``words`` that skips the axes'
    shifts (its array holds up to 3 more rows and columns than it shows)."""
    k, gr, _, gc = words.shape
    full = words.view(bool).reshape(k, 4 * gr, 4 * gc)
    return full[:, rows.shift:rows.shift + len(rows.of), cols.shift:cols.shift + len(cols.of)]


def block_starts(axis: AxisGroups) -> np.ndarray:
    """(G,) bool: the groups that begin their :func:`block_words` block (group ``g`` starts
    at pixel ``4 g - shift``) and have at most 4 pixels, so that slot ``l`` of the group is
    row (or column) ``l`` of block ``g``. At the network's input size every group but the
    first two (the first cell's six pixels, cut 4 + 2)."""
    if axis.shift is None:
        return np.zeros(len(axis.starts) - 1, bool)
    first = axis.starts[:-1]
    return (first == 4 * np.arange(len(first)) - axis.shift) & (np.diff(axis.starts) <= 4)


def spread(groups: np.ndarray, axis: AxisGroups) -> np.ndarray:
    """(K, R, n) bool: (K, R, G) bool ``groups`` with each group repeated to its pixels along
    the last axis, ``np.take(groups, axis.of, axis=2)`` (a byte gather); through ``runs``,
    a multiplication that writes every group 4 times and a few slice copies (3x faster)."""
    if axis.runs is None:
        return np.take(groups, axis.of, axis=2)
    wide = (groups.view(np.uint8).astype(np.uint32) * np.uint32(0x01010101)).view(np.uint8)
    out = np.empty((*groups.shape[:2], len(axis.of)), bool)
    for first, end, slot in axis.runs:
        out[:, :, first:end] = wide[:, :, slot:slot + end - first]
    return out


def group_maps(above: np.ndarray, rows: AxisGroups, cols: AxisGroups,
               scratch: np.ndarray) -> np.ndarray:
    """(K, Gr, Gc): the bits that every source of the group has in ``above`` ((K, h4, w4)
    bool, or uint8 for several maps at once, one per bit). The cell maps are computed in
    ``scratch`` (an array of ``above``'s shape and dtype) and in ``above`` itself, which are
    both overwritten: no fresh (K, h4, w4) array."""
    pairs = scratch  # rows c and c + 1 (the last row replicated)
    np.copyto(pairs, above)
    pairs[:, :-1] &= above[:, 1:]
    cells = above  # cell c: rows and columns c and c + 1, by one flat AND
    np.bitwise_and(pairs.reshape(-1)[:-1], pairs.reshape(-1)[1:], out=cells.reshape(-1)[:-1])
    cells[:, :, -1] = pairs[:, :, -1]  # (each row's last column: itself, replicated)
    out = _take(cells, rows.ca, axis=1)
    if not np.array_equal(rows.ca, rows.cb):
        out &= _take(cells, rows.cb, axis=1)
    if np.array_equal(cols.ca, cols.cb):
        return _take(out, cols.ca, axis=2)
    return _take(out, cols.ca, axis=2) & _take(out, cols.cb, axis=2)


def _take(a: np.ndarray, index: np.ndarray, axis: int) -> np.ndarray:
    """``np.take(a, index, axis)`` for 3-D ``a``: by a few slice copies where ``index`` is at
    most 3 runs of consecutive values (the groups at the input size: the first cell twice,
    then every cell), else by ``np.take`` (much faster than fancy indexing)."""
    cuts = (np.flatnonzero(np.diff(index) != 1) + 1).tolist()
    if len(cuts) > 2:
        return np.take(a, index, axis=axis)
    out = np.empty((*a.shape[:axis], len(index), *a.shape[axis + 1:]), a.dtype)
    lead = (slice(None),) * axis
    for start, end in zip([0, *cuts], [*cuts, len(index)]):
        first = int(index[start])
        out[(*lead, slice(start, end))] = a[(*lead, slice(first, first + end - start))]
    return out
