"""PyTorch's CPU bilinear interpolation, reproduced bit for bit at chosen pixels (numpy).

:mod:`serving.inference.paste` decides almost every mask pixel without interpolating (all
its sources are on one side of the threshold); the few pixels near a mask's edge are
computed here, exactly as ``F.interpolate(..., mode="bilinear")`` computes them, from
PyTorch's own index and weight formulas (``UpSample.h``) and the operation order of its
generic CPU kernel (``UpSampleKernel.cpp``, used when output height + width > 128): the
two columns of each row first, then the two rows. Whether that kernel fuses a product into
the addition (an FMA) is a property of the build and the CPU, so it is found once per
process by comparing with ``F.interpolate`` on probe inputs (:func:`cpu_fused`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

#: ``F.interpolate`` (bilinear, CPU) uses another kernel when output height + width <= this.
SMALL_OUTPUT = 128


class Axis(NamedTuple):
    """Bilinear sampling along one axis: output index o reads input indices ``i0[o]`` and
    ``i1[o]`` (int64) with weights ``w0[o]`` and ``w1[o]`` (float32)."""

    i0: np.ndarray
    i1: np.ndarray
    w0: np.ndarray
    w1: np.ndarray

    def take(self, index: np.ndarray | slice) -> Axis:
        """The sampling of the output indices ``index``."""
        return Axis(*(a[index] for a in self))


def fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
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


def combine(a: np.ndarray, wa: np.ndarray, b: np.ndarray, wb: np.ndarray,
            fused: bool) -> np.ndarray:
    """``a * wa + b * wb`` in float32 as PyTorch's kernel computes it (first product fused
    into the addition when ``fused``)."""
    if fused:
        return fma32(a, wa, (b * wb).astype(np.float32, copy=False))
    return (a * wa + b * wb).astype(np.float32, copy=False)  # float32 products and sum


def resize_axis(in_size: int, out_size: int, fused: bool) -> Axis:
    """``align_corners=False`` resize from ``in_size`` to ``out_size``: PyTorch's
    ``area_pixel_compute_source_index`` + ``guard_index_and_lambda`` in float32 (``fused``:
    ``scale * (o + 0.5) - 0.5`` is one FMA)."""
    scale = np.float32(np.float32(in_size) / np.float32(out_size))
    dst = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
    half = np.full(out_size, -0.5, np.float32)
    if fused:
        src = fma32(np.full(out_size, scale, np.float32), dst, half)
    else:
        src = ((scale * dst).astype(np.float32) + half).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    w1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    i1 = i0 + (i0 < in_size - 1)
    return Axis(i0, i1, (np.float32(1) - w1).astype(np.float32), w1)


def aligned_axis(in_size: int, out_size: int) -> Axis:
    """CondInst's aligned x4 upsampling (:func:`serving.model.ops.aligned_bilinear`) along one
    axis, for output indices 0..out_size-1 (out_size <= 4 * in_size).

    ``align_corners=True`` from in_size + 1 (the input replicate-padded by one at the end) to
    4 * in_size + 1 samples at exact quarters (scale 1/4), and the two replicated rows in
    front make output o read position ``max(o - 2, 0) / 4``. Indices are into the unpadded
    input (the padded index ``in_size`` is its last one).
    """
    v = np.maximum(np.arange(out_size, dtype=np.int64) - 2, 0)
    i0 = v // 4
    w1 = ((v % 4) * 0.25).astype(np.float32)
    return Axis(i0, np.minimum(i0 + 1, in_size - 1), (np.float32(1) - w1).astype(np.float32),
                w1)


def sample(src: np.ndarray, k: np.ndarray | int, ys: Axis, xs: Axis, fused: bool) -> np.ndarray:
    """Bilinear samples of float32 ``src`` (K, H, W) at map ``k`` and pixels (ys[j], xs[j])
    (parallel 1-D axes), with the operation order of PyTorch's CPU kernel."""
    top = combine(src[k, ys.i0, xs.i0], xs.w0, src[k, ys.i0, xs.i1], xs.w1, fused)
    bottom = combine(src[k, ys.i1, xs.i0], xs.w0, src[k, ys.i1, xs.i1], xs.w1, fused)
    return combine(top, ys.w0, bottom, ys.w1, fused)


def grid(ys: Axis, xs: Axis) -> tuple[Axis, Axis]:
    """Every (row, column) combination of two axes, as parallel flat axes (row-major)."""
    ny, nx = len(ys.i0), len(xs.i0)
    return Axis(*(np.repeat(a, nx) for a in ys)), Axis(*(np.tile(a, ny) for a in xs))


_VARIANT: dict[str, bool | None] = {}


def _reproduces(fused: bool, gen: torch.Generator) -> bool:
    """Whether ``fused`` reproduces ``F.interpolate`` on probe inputs: align_corners=False
    resizes, and the aligned x4 upsampling."""
    for size, out in (((47, 61), (150, 211)), ((311, 257), (97, 131)), ((53, 40), (53, 173))):
        x = torch.rand(size, generator=gen)
        ref = F.interpolate(x[None, None], size=out, mode="bilinear", align_corners=False)
        ys, xs = grid(resize_axis(size[0], out[0], fused), resize_axis(size[1], out[1], fused))
        if not np.array_equal(sample(x.numpy()[None], 0, ys, xs, fused).reshape(out),
                              ref[0, 0].numpy()):
            return False
    x = torch.rand((1, 1, 29, 37), generator=gen)
    padded = F.pad(x, (0, 1, 0, 1), mode="replicate")
    ref = F.interpolate(padded, size=(4 * 29 + 1, 4 * 37 + 1), mode="bilinear",
                        align_corners=True)
    ref = F.pad(ref, (2, 0, 2, 0), mode="replicate")[0, 0, : 4 * 29, : 4 * 37]
    ys, xs = grid(aligned_axis(29, 4 * 29), aligned_axis(37, 4 * 37))
    got = sample(x[0].numpy(), 0, ys, xs, fused).reshape(4 * 29, 4 * 37)
    return bool(np.array_equal(got, ref.numpy()))


def cpu_fused() -> bool | None:
    """Whether this process's CPU bilinear kernel fuses multiply-adds (found once by comparing
    with ``F.interpolate`` on probe inputs); ``None`` when neither variant reproduces it."""
    if "cpu" not in _VARIANT:
        gen = torch.Generator().manual_seed(0)
        found = None
        for fused in (True, False):
            if _reproduces(fused, gen):
                found = fused
                break
        _VARIANT["cpu"] = found
    return _VARIANT["cpu"]
