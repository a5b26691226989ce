"""Stride-4 mask probabilities -> boolean masks of the original image, stored as crops.

The masks are those of the pipeline of SIM_SPEC section 5, step 4: CondInst's aligned x4
upsampling of the padded input's probabilities, crop to the resized image, bilinear resize
(``align_corners=False``) to the original size, threshold; prompted masks are also zeroed
outside their box. Done for the whole image, that is several float copies of an (N, H0, W0)
array (12 GB of booleans alone for 256 masks of an 8000x6000 image). Here each instance is
computed only inside its *region*: the rows and columns whose bilinear sources include a
stride-4 probability above the threshold (every other pixel is certainly False), intersected
with the clip box; the region is processed in bands of about ``BAND_PIXELS`` output pixels
and stored as a tight crop (:class:`serving.masks.InstanceMasks`). Memory and float work grow
with the masks' extents, not with ``N x H0 x W0``.

The result is bit-identical to the whole-image computation:

- the x4 upsampling of a window of the probabilities uses ``F.interpolate`` itself; with
  ``align_corners=True`` and a window of n+1 rows to 4n+1 rows its sampling positions are
  exact quarters, the same as the whole map's (windows are kept large enough that PyTorch
  picks the same kernel as for the whole map);
- the resize to the original size is recomputed here from PyTorch's own index and weight
  formulas (``UpSample.h``). A float32 estimate decides every pixel farther than a few
  rounding errors from the threshold; the rare pixels closer to it are recomputed with the
  exact operation order of PyTorch's CPU kernel. That order (fused multiply-adds or not) is
  a property of the build and the CPU, so it is found once per process by comparing with
  ``F.interpolate`` on probe inputs; when no candidate matches, and on other devices, each
  mask is computed at full size, a few at a time, and cut to its region (same result,
  bounded memory, more float work).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..masks import InstanceMasks
from ..model.ops import aligned_bilinear

#: Float intermediates of the whole-image fallback are kept below this many bytes per chunk
#: on the CPU (fresh allocations of tens of MB cost more in page faults than the arithmetic).
CPU_CHUNK_BYTES = 16 << 20
#: Bytes of full-size float masks per chunk of the fallback on other devices.
DEVICE_CHUNK_BYTES = 256 << 20
#: Output pixels per band of the region computation (a few float32 copies of this).
BAND_PIXELS = 1 << 20
#: Stride-4 probabilities above ``threshold - SUPPORT_MARGIN`` make up a mask's support.
SUPPORT_MARGIN = 1e-4
#: Pixels whose float32 estimate is within this (times max(1, |values|)) of the threshold
#: are recomputed exactly; the estimate and every exact variant differ by < 1e-6.
EXACT_MARGIN = 2.0 ** -16
#: ``F.interpolate`` (bilinear, CPU) switches kernel when output height + width <= this.
SMALL_OUTPUT = 128


class _Axis(NamedTuple):
    """PyTorch's bilinear (``align_corners=False``) sampling along one axis.

    Output index o reads input indices ``i0[o]`` and ``i1[o]`` with weights ``w0[o]`` and
    ``w1[o]`` (float32), ``i1 = i0 + 1`` except at the last input index.
    """

    i0: np.ndarray
    i1: np.ndarray
    w0: np.ndarray
    w1: np.ndarray


def _fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 fused multiply-add ``a * b + c`` rounded once (exact emulation).

    ``a * b`` is exact in float64; the float64 sum's own rounding error (TwoSum) turns it
    into round-to-odd, after which rounding to float32 equals a single rounding.
    """
    p = a.astype(np.float64) * b.astype(np.float64)
    c64 = np.asarray(c, dtype=np.float64)
    s = p + c64
    bb = s - p
    err = (p - (s - bb)) + (c64 - bb)
    even = (s.view(np.int64) & 1) == 0
    fix = (err != 0) & even
    s = np.where(fix, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s.astype(np.float32)


def _combine(a: np.ndarray, wa: np.ndarray, b: np.ndarray, wb: np.ndarray,
             fused: bool) -> np.ndarray:
    """``a * wa + b * wb`` in float32 as PyTorch's kernel computes it (first product fused
    into the addition when ``fused``)."""
    if fused:
        return _fma32(a, wa, (b * wb).astype(np.float32))
    return ((a * wa).astype(np.float32) + (b * wb).astype(np.float32)).astype(np.float32)


def _axis(in_size: int, out_size: int, fused: bool) -> _Axis:
    """PyTorch's ``area_pixel_compute_source_index`` + ``guard_index_and_lambda`` for
    ``align_corners=False``, in float32 (``fused``: ``scale * (o + 0.5) - 0.5`` is one FMA)."""
    scale = np.float32(np.float32(in_size) / np.float32(out_size))
    dst = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
    half = np.full(out_size, -0.5, np.float32)
    if fused:
        src = _fma32(np.full(out_size, scale, np.float32), dst, half)
    else:
        src = ((scale * dst).astype(np.float32) + half).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    w1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    i1 = i0 + (i0 < in_size - 1)
    return _Axis(i0, i1, (np.float32(1) - w1).astype(np.float32), w1)


def _resize_exact(src: np.ndarray, ys: _Axis, xs: _Axis, fused: bool) -> np.ndarray:
    """Bilinear samples of 2-D float32 ``src`` at the pixels (ys[k], xs[k]) (parallel 1-D
    axes), with the operation order of PyTorch's CPU kernel: rows of each column pair
    first, then the two rows."""
    top = _combine(src[ys.i0, xs.i0], xs.w0, src[ys.i0, xs.i1], xs.w1, fused)
    bottom = _combine(src[ys.i1, xs.i0], xs.w0, src[ys.i1, xs.i1], xs.w1, fused)
    return _combine(top, ys.w0, bottom, ys.w1, fused)


def _pairs(ys: _Axis, xs: _Axis) -> tuple[_Axis, _Axis]:
    """Every (row, column) combination of two axes, as parallel flat axes."""
    ny, nx = len(ys.i0), len(xs.i0)
    return (_Axis(*(np.repeat(a, nx) for a in ys)), _Axis(*(np.tile(a, ny) for a in xs)))


_VARIANT: dict[str, bool | None] = {}


def _cpu_fused() -> bool | None:
    """Whether this process's CPU bilinear kernel fuses multiply-adds (found by comparing
    with ``F.interpolate`` on probe inputs); ``None`` when neither variant reproduces it."""
    if "cpu" not in _VARIANT:
        gen = torch.Generator().manual_seed(0)
        probes = [((47, 61), (150, 211)), ((311, 257), (97, 131)), ((53, 40), (53, 173))]
        found = None
        for fused in (True, False):
            ok = True
            for size, out in probes:
                x = torch.rand(size, generator=gen)
                ref = F.interpolate(x[None, None], size=out, mode="bilinear",
                                    align_corners=False)[0, 0].numpy()
                ys, xs = _pairs(_axis(size[0], out[0], fused), _axis(size[1], out[1], fused))
                ok = ok and np.array_equal(_resize_exact(x.numpy(), ys, xs, fused).reshape(out),
                                           ref)
            if ok:
                found = fused
                break
        _VARIANT["cpu"] = found
    return _VARIANT["cpu"]


class _Geometry(NamedTuple):
    """Sizes of one image's masks: stride-4 map (h4, w4), resized image (rh, rw) inside the
    padded input, original (h0, w0), and the resize axes (``None`` when rh, rw == h0, w0)."""

    h4: int
    w4: int
    rh: int
    rw: int
    h0: int
    w0: int
    ys: _Axis | None
    xs: _Axis | None


def _span(lo: int, hi: int, axis: _Axis | None, size: int) -> tuple[int, int]:
    """Original indices [a, b) whose resize sources touch resized indices lo..hi, plus two
    pixels of slack on each side (so any kernel variant's indices are covered)."""
    if axis is None:
        a, b = lo, hi + 1
    else:
        a = int(np.searchsorted(axis.i1, lo, "left"))
        b = int(np.searchsorted(axis.i0, hi, "right"))
    return max(a - 2, 0), min(b + 2, size)


def _region(probs: Tensor, geo: _Geometry, threshold: float,
            box: np.ndarray | None) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1) of the original image outside which mask ``probs`` ((h4, w4)) is
    certainly False, intersected with ``box`` (XYXY float32, pixel centres inside it), or
    ``None`` when the mask is empty.

    A bilinear sample never exceeds (beyond rounding) the largest of its sources: stride-4
    rows pa..pb above the threshold feed upsampled rows 4pa-2..4pb+5 (aligned upsampling
    reads rows floor((r-2)/4) and the next), which feed the original rows that read them.
    """
    support = probs > threshold - SUPPORT_MARGIN
    rows = torch.nonzero(support.any(dim=1))[:, 0]
    if not rows.numel():
        return None
    cols = torch.nonzero(support.any(dim=0))[:, 0]
    ra, rb = max(4 * int(rows[0]) - 3, 0), min(4 * int(rows[-1]) + 6, geo.rh - 1)
    ca, cb = max(4 * int(cols[0]) - 3, 0), min(4 * int(cols[-1]) + 6, geo.rw - 1)
    if ra > rb or ca > cb:
        return None
    y0, y1 = _span(ra, rb, geo.ys, geo.h0)
    x0, x1 = _span(ca, cb, geo.xs, geo.w0)
    if box is not None:  # the clip test of pixel centres, as float32 comparisons
        x1b, y1b, x2b, y2b = box
        centres_y = np.arange(geo.h0, dtype=np.float32) + np.float32(0.5)
        centres_x = np.arange(geo.w0, dtype=np.float32) + np.float32(0.5)
        y0 = max(y0, int(np.searchsorted(centres_y, y1b, "left")))
        y1 = min(y1, int(np.searchsorted(centres_y, y2b, "right")))
        x0 = max(x0, int(np.searchsorted(centres_x, x1b, "left")))
        x1 = min(x1, int(np.searchsorted(centres_x, x2b, "right")))
    if y0 >= y1 or x0 >= x1:
        return None
    return y0, y1, x0, x1


def _grow(lo: int, hi: int, limit: int, extra: int) -> tuple[int, int]:
    """Widen [lo, hi] inside [0, limit] by up to ``extra`` (upwards first)."""
    up = min(extra, limit - hi)
    return max(lo - (extra - up), 0), hi + up


def _upsampled(probs: Tensor, geo: _Geometry, rows: tuple[int, int],
               cols: tuple[int, int]) -> Tensor:
    """Rows/columns lo..hi (inclusive) of ``aligned_bilinear(probs, 4)``, float32, computed
    from a window of ``probs`` (bit-identical: see the module docstring).

    Output row r is the align_corners x4 interpolation of the replicate-padded map at row
    max(r - 2, 0), which reads padded rows q and q + 1, q = max(r - 2, 0) // 4.
    """
    (ra, rb), (ca, cb) = rows, cols
    qa, qb = max(ra - 2, 0) // 4, min(max(rb - 2, 0) // 4 + 1, geo.h4)
    qc, qd = max(ca - 2, 0) // 4, min(max(cb - 2, 0) // 4 + 1, geo.w4)
    need = SMALL_OUTPUT // 4 - (qb - qa) - (qd - qc)  # keep PyTorch's kernel for large maps
    if need > 0:
        qa, qb = _grow(qa, qb, geo.h4, need)
        qc, qd = _grow(qc, qd, geo.w4, SMALL_OUTPUT // 4 - (qb - qa) - (qd - qc))
    dev = probs.device
    window = probs.float().index_select(0, torch.arange(qa, qb + 1, device=dev).clamp(
        max=geo.h4 - 1)).index_select(1, torch.arange(qc, qd + 1, device=dev).clamp(
            max=geo.w4 - 1))  # (padded) rows qa..qb, columns qc..qd
    up = F.interpolate(window[None, None], size=(4 * (qb - qa) + 1, 4 * (qd - qc) + 1),
                       mode="bilinear", align_corners=True)[0, 0]
    r = (torch.arange(ra, rb + 1, device=dev) - 2).clamp(min=0) - 4 * qa
    c = (torch.arange(ca, cb + 1, device=dev) - 2).clamp(min=0) - 4 * qc
    return up.index_select(0, r).index_select(1, c)


def _resize_threshold(up: Tensor, origin: tuple[int, int], ys: _Axis, xs: _Axis,
                      threshold: float, fused: bool) -> np.ndarray:
    """``resize(up) > threshold`` at output rows ``ys`` x columns ``xs`` (their indices are in
    the resized frame; ``up`` holds resized rows/columns from ``origin``). (len(ys), len(xs))
    bool, bit-identical to ``F.interpolate`` + threshold (see the module docstring)."""
    ya, xa = origin
    yi0, yi1 = torch.from_numpy(ys.i0 - ya), torch.from_numpy(ys.i1 - ya)
    xi0, xi1 = torch.from_numpy(xs.i0 - xa), torch.from_numpy(xs.i1 - xa)
    rows = up[:, xi0] * torch.from_numpy(xs.w0) + up[:, xi1] * torch.from_numpy(xs.w1)
    est = (rows[yi0] * torch.from_numpy(ys.w0)[:, None]
           + rows[yi1] * torch.from_numpy(ys.w1)[:, None])  # float32 estimate
    mask = (est > threshold).numpy()
    margin = EXACT_MARGIN * max(1.0, float(up.abs().max()), abs(threshold))
    near = torch.nonzero((est - threshold).abs() <= margin).numpy()
    if len(near):
        r, c = near[:, 0], near[:, 1]
        ys_k = _Axis(ys.i0[r] - ya, ys.i1[r] - ya, ys.w0[r], ys.w1[r])
        xs_k = _Axis(xs.i0[c] - xa, xs.i1[c] - xa, xs.w0[c], xs.w1[c])
        mask[r, c] = _resize_exact(up.numpy(), ys_k, xs_k, fused) > np.float32(threshold)
    return mask


def _crop_by_region(probs: Tensor, geo: _Geometry, region: tuple[int, int, int, int],
                    threshold: float, fused: bool) -> np.ndarray:
    """The mask inside ``region`` (y0, y1, x0, x1): (y1 - y0, x1 - x0) bool, in row bands."""
    y0, y1, x0, x1 = region
    out = np.empty((y1 - y0, x1 - x0), bool)
    band = max(1, BAND_PIXELS // (x1 - x0))
    if geo.xs is None:
        cols = (x0, x1 - 1)
    else:
        xs = _Axis(*(a[x0:x1] for a in geo.xs))
        cols = (int(xs.i0[0]), int(xs.i1[-1]))
    for ya in range(y0, y1, band):
        yb = min(ya + band, y1)
        if geo.ys is None:  # same size: the upsampled map is the image
            up = _upsampled(probs, geo, (ya, yb - 1), cols)
            out[ya - y0:yb - y0] = (up > threshold).numpy()
            continue
        ys = _Axis(*(a[ya:yb] for a in geo.ys))
        rows = (int(ys.i0[0]), int(ys.i1[-1]))
        up = _upsampled(probs, geo, rows, cols)
        out[ya - y0:yb - y0] = _resize_threshold(up, (rows[0], cols[0]), ys, xs, threshold,
                                                 fused)
    return out


def _dense_chunk(probs: Tensor, geo: _Geometry, threshold: float) -> Tensor:
    """(n, h0, w0) bool full-size masks of (n, h4, w4) ``probs`` on their device: the
    whole-image pipeline (the fallback, and the definition the crops reproduce)."""
    probs = probs[:, None].float()
    if geo.ys is None:  # same size: threshold at stride 1, then shift (exact, see below)
        out = torch.empty((probs.shape[0], geo.h0, geo.w0), dtype=torch.bool,
                          device=probs.device)
        _upsample4_threshold_into(out, probs, threshold)
        return out
    part = aligned_bilinear(probs, 4)[:, :, : geo.rh, : geo.rw]
    part = F.interpolate(part, size=(geo.h0, geo.w0), mode="bilinear", align_corners=False)
    return part[:, 0] > threshold


def _crops_dense(mask_probs: Tensor, geo: _Geometry, threshold: float,
                 regions: list[tuple[int, int, int, int] | None]) -> list[np.ndarray]:
    """Each non-empty mask at full size, a few at a time, cut to its region."""
    live = [k for k, r in enumerate(regions) if r is not None]
    per_mask = 4 * ((4 * geo.h4 + 3) * (4 * geo.w4 + 3) + geo.h0 * geo.w0)
    budget = CPU_CHUNK_BYTES if mask_probs.device.type == "cpu" else DEVICE_CHUNK_BYTES
    step = max(1, budget // per_mask)
    crops = [np.zeros((0, 0), bool)] * len(regions)
    for start in range(0, len(live), step):
        idx = live[start:start + step]
        masks = _dense_chunk(mask_probs[idx], geo, threshold)
        for k, mask in zip(idx, masks):
            y0, y1, x0, x1 = regions[k]  # type: ignore[misc]
            crops[k] = mask[y0:y1, x0:x1].cpu().numpy()
    return crops


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
    h0, w0 = (int(v) for v in orig_size)
    rh, rw = (int(v) for v in resized_size)
    same = (rh, rw) == (h0, w0)
    cpu = mask_probs.device.type == "cpu"
    fused = _cpu_fused() if cpu and not same else None
    exact = cpu and (same or (fused is not None and h0 + w0 > SMALL_OUTPUT))
    ax_fused = True if fused is None else fused
    geo = _Geometry(int(mask_probs.shape[-2]), int(mask_probs.shape[-1]), rh, rw, h0, w0,
                    None if same else _axis(rh, h0, ax_fused),
                    None if same else _axis(rw, w0, ax_fused))
    boxes = None
    if clip_boxes is not None:
        boxes = torch.as_tensor(clip_boxes).float().cpu().numpy().reshape(-1, 4)
    regions = [_region(mask_probs[k].float(), geo, threshold,
                       None if boxes is None else boxes[k]) for k in range(len(mask_probs))]
    if exact:
        crops = [np.zeros((0, 0), bool) if r is None else
                 _crop_by_region(mask_probs[k], geo, r, threshold, bool(fused))
                 for k, r in enumerate(regions)]
    else:
        crops = _crops_dense(mask_probs, geo, threshold, regions)
    return _tighten(crops, regions, (h0, w0))


def _tighten(crops: list[np.ndarray], regions: list[tuple[int, int, int, int] | None],
             size: tuple[int, int]) -> InstanceMasks:
    """Cut each region's crop to the bounding box of its True pixels."""
    out, offsets = [], []
    for crop, region in zip(crops, regions):
        rows = np.flatnonzero(crop.any(axis=1)) if region is not None else np.zeros(0, int)
        if not rows.size:
            out.append(np.zeros((0, 0), bool))
            offsets.append((0, 0))
            continue
        cols = np.flatnonzero(crop.any(axis=0))
        out.append(crop[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].copy())
        offsets.append((region[0] + rows[0], region[2] + cols[0]))  # type: ignore[index]
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
