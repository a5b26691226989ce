"""Full-resolution refinement of a box-prompted mask inside its box.

The network's mask probabilities come at a quarter of its input resolution
(:mod:`serving.inference.paste`); upsampled bilinearly, their outline is smooth where the
object's is not, and a shape with a hole or gaps comes out filled. Here one box's
probabilities are sampled at full resolution over the box and a margin (:func:`box_probs`,
the same bilinear mapping as the paste pipeline), combined with a colour model of the
region learnt from the network's own mask (:func:`colour_model`) and filtered by a colour
guided filter with the image as the guide (:func:`guided_filter`; He,
Sun and Tang, "Guided Image Filtering", TPAMI 2013): in every window the output is the
affine function of the pixels' colours that best fits the probabilities, so an outline the
network drew between two colours moves onto the colour edge, while a region of one colour
keeps its mean probability. The window's radius is ``RADIUS_FRACTION`` of the box's size and
the regulariser ``EPS`` (colours in 0..1): chosen on the training splits of the nuclei and
synthetic data (``benchmarks/prompted_quality.py`` reports it on the validation splits).

Memory and time are bounded by the box, not the image. The colour model, the filter's fit
and the score see a region of more than ``FULL_PIXELS`` pixels on a grid of about
``GRID_PIXELS`` cells (area-averaged); the filter is then applied with the region's
full-resolution colours, so a large box's mask still follows the image's own edges. A
region of at most ``REFINE_PIXELS`` pixels is refined so; a larger one keeps the network's
own mask (:mod:`serving.inference.paste`, which never holds the region's floats) and is only
scored on the grid (:mod:`serving.inference.quality`).

Geometry: original-image pixels (XYXY boxes, ``(y0, x0, y1, x1)`` regions); a
:class:`Source` is one network output, in its own crop's input frame.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..masks import InstanceMasks

#: The filter's window radius, as a fraction of the box's size ``sqrt(w * h)``.
RADIUS_FRACTION = 1 / 8
#: The guided filter's regulariser (colours in 0..1): larger keeps the probabilities smoother.
EPS = 1e-2
#: Margin around the box that the filter sees, as a fraction of the box's size (>= 2 px).
MARGIN_FRACTION = 0.15
#: Boxes smaller than this (``sqrt(w * h)``, original pixels) are not filtered: their windows
#: hold too few pixels to fit colours (on the nuclei training split's boxes it lost IoU under
#: 16 px, changed nothing at 16-24 px and gained from 24 px on).
MIN_SIDE = 24.0
#: A region (box and margin) of at most this many pixels is refined, its mask cut at full
#: resolution; a larger one keeps the network's own mask.
REFINE_PIXELS = 1024 * 1024
#: The colour model, the guided filter's fit and the score see a region of at most this
#: many pixels at its own pixels ...
FULL_PIXELS = 256 * 256
#: ... and a larger one on a grid of about this many cells (area-averaged): its cost no
#: longer grows with the region's size, except for reading its pixels and the filter's
#: output at full resolution.
GRID_PIXELS = 128 * 128
#: ... with at least this many cells across the box on each axis (more cells along a thin
#: box's short axis).
MIN_BOX_CELLS = 8
#: Windows of a larger radius are fitted on maps area-averaged to about this radius.
SUBSAMPLE_RADIUS = 4
#: Levels per colour channel of the colour model's histograms (8: 512 colours).
COLOUR_LEVELS = 8
#: Weight of the colour model's log-likelihood ratio added to the network's logit (scaled
#: by how well the colours separate: :func:`colour_model`).
COLOUR_WEIGHT = 2.5
#: Probabilities are clamped to [PROB_EPS, 1 - PROB_EPS] before their logit is taken.
PROB_EPS = 1e-4


class Source(NamedTuple):
    """One network output for a box.

    Attributes:
        probs: (H/4, W/4) float32 stride-4 mask probabilities of the canvas.
        window: (x0, y0, x1, y1) int original-pixel window the canvas shows (after
            ``mirrored``: in the mirrored image).
        resized: (h, w) of the window resized at the network input.
        mirrored: whether the network saw the image flipped left-right.
    """

    probs: Tensor
    window: tuple[int, int, int, int]
    resized: tuple[int, int]
    mirrored: bool = False


def box_region(box: np.ndarray, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1) int: the XYXY ``box`` plus ``MARGIN_FRACTION`` of its size (at
    least 2 px) on each side, clipped to the (H, W) image, at least 1x1."""
    x1, y1, x2, y2 = (float(v) for v in box)
    margin = max(2.0, MARGIN_FRACTION * math.sqrt(max(x2 - x1, 0.0) * max(y2 - y1, 0.0)))
    height, width = image_size
    y0, x0 = min(height - 1, max(0, math.floor(y1 - margin))), min(
        width - 1, max(0, math.floor(x1 - margin)))
    ye, xe = min(height, math.ceil(y2 + margin)), min(width, math.ceil(x2 + margin))
    return y0, x0, max(ye, y0 + 1), max(xe, x0 + 1)


def _cells(start: int, end: int, count: int, window: tuple[int, int], resized: int,
           cells: int) -> np.ndarray:
    """(count,) float32 stride-4 cell coordinates of ``count`` evenly spaced sample
    centres over original pixels ``start..end``: original -> network input
    (``align_corners=False`` resize of the window) -> cell (CondInst's aligned x4
    upsampling: input pixel ``i`` is cell ``(i - 2) / 4``), clamped like the pipeline.
    (numpy float64: cheaper than torch on these short arrays.)"""
    step = (end - start) / count
    coords = start + (np.arange(count, dtype=np.float64) + 0.5) * step - 0.5
    scale = resized / (window[1] - window[0])
    inputs = np.clip((coords - window[0] + 0.5) * scale - 0.5, 0, resized - 1)
    return np.minimum(np.maximum(inputs - 2, 0) / 4, cells - 1).astype(np.float32)


def box_probs(source: Source, region: tuple[int, int, int, int], image_width: int,
              size: tuple[int, int]) -> Tensor:
    """(h, w) float32 probabilities of ``source`` sampled on an (h, w) ``size`` grid over
    ``region`` (original pixels; at full resolution, ``size`` = the region's size, the
    values of the paste pipeline before its threshold, up to float rounding)."""
    y0, x0, y1, x1 = region
    if source.mirrored:
        x0, x1 = image_width - x1, image_width - x0
    wx0, wy0, wx1, wy1 = source.window
    h4, w4 = source.probs.shape[-2:]
    gy = _cells(y0, y1, size[0], (wy0, wy1), source.resized[0], h4)
    gx = _cells(x0, x1, size[1], (wx0, wx1), source.resized[1], w4)
    grid = np.empty((*size, 2), np.float32)  # (x, y) of every sample, in [-1, 1]
    grid[..., 0] = gx / np.float32(max(w4 - 1, 1)) * 2 - 1
    grid[..., 1] = (gy / np.float32(max(h4 - 1, 1)) * 2 - 1)[:, None]
    out = F.grid_sample(source.probs[None, None].float(), torch.from_numpy(grid)[None],
                        mode="bilinear", align_corners=True)[0, 0]
    return out.flip(-1) if source.mirrored else out


def _box_mean(x: Tensor, radius: int) -> Tensor:
    """(C, h, w) float32 -> the mean over each (2r+1)^2 window, edges replicated: the input
    padded once, then a running sum along each axis (cost independent of the radius).

    Float32 sums suffice for the centred maps of :func:`_coefficients` (their running sums
    stay small); the result differs from a float64 one by about 1e-7.
    """
    k = 2 * radius + 1
    padded = F.pad(x[None], (radius + 1, radius, radius + 1, radius), mode="replicate")[0]
    maps = padded.numpy()  # (numpy for the cheap steps: less per call than torch)
    maps[..., 0, :] = 0  # a zero before each row and column: the running sums then start at 0
    maps[..., :, 0] = 0
    for axis in (2, 1):
        # in place (the padded copy, then each difference, is ours); torch's sum is exact in
        # float64 before each value is rounded, numpy's would round as it goes
        sums = torch.from_numpy(maps).cumsum_(axis - 3).numpy()
        n = sums.shape[axis] - k
        later, earlier = [slice(None)] * 3, [slice(None)] * 3
        later[axis], earlier[axis] = slice(k, k + n), slice(0, n)
        maps = sums[tuple(later)] - sums[tuple(earlier)]  # window j: sums[j + k] - sums[j]
    maps /= k * k
    return torch.from_numpy(maps)


def _solve3(cov: np.ndarray, rhs: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Per pixel, ``inv(cov) @ rhs`` for symmetric (6, h, w) float32 ``cov`` (xx, xy, xz,
    yy, yz, zz) and (3, h, w) ``rhs``, by the adjugate (elementwise: no batched LAPACK
    call), into (3, h, w) ``out``."""
    adjugate = cov[_ADJ_A] * cov[_ADJ_B] - cov[_ADJ_C] * cov[_ADJ_D]  # symmetric
    det = (cov[:3] * adjugate[:3]).sum(0)
    full = adjugate[_SYMMETRIC].reshape(3, 3, *det.shape)
    full *= rhs[None]
    return np.divide(full.sum(1), det, out=out)


def _pair_products(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The six distinct products of the three channels of (3, h, w) ``x`` (the order of
    ``_PAIRS``) into (6, h, w) ``out``, by three broadcast multiplies."""
    np.multiply(x[0:1], x, out=out[0:3])
    np.multiply(x[1:2], x[1:], out=out[3:5])
    np.multiply(x[2], x[2], out=out[5])
    return out


#: The six distinct products of the three colour channels (the covariance's entries).
_PAIRS = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))
#: The adjugate of a symmetric 3x3 (rows a b c / b d e / c e f, entries as in ``_PAIRS``):
#: entry k is ``cov[A[k]] * cov[B[k]] - cov[C[k]] * cov[D[k]]`` (d f - e e, c e - b f, ...).
_ADJ_A, _ADJ_B, _ADJ_C, _ADJ_D = (np.array(index) for index in (
    (3, 2, 1, 0, 1, 0), (5, 4, 4, 5, 2, 3), (4, 1, 2, 2, 0, 1), (4, 5, 3, 2, 4, 1)))
#: The 3x3 matrix's nine entries, row by row, from the six of a symmetric one.
_SYMMETRIC = np.array((0, 1, 2, 1, 3, 4, 2, 4, 5))


def guided_filter(guide: Tensor, probs: Tensor, radius: int, eps: float = EPS) -> Tensor:
    """The colour guided filter of ``probs`` with ``guide``: :func:`apply_guided` of
    :func:`guided_coefficients`.

    Args:
        guide: (3, h, w) float32 colours in 0..1 (or in any units, with ``eps`` in their
            square: ``EPS * 255 ** 2`` for 0..255 gives the same filter).
        probs: (h, w) float32 the map to filter.
        radius: window radius in pixels; eps: regulariser of the per-window fit.

    Returns:
        (h, w) float32: ``mean_a(x) . I(x) + mean_b(x)``, with ``(a, b)`` the ridge
        regression ``p ~ a . I + b`` of each window (He et al., eq. 5-8, colour case).
    """
    return apply_guided(guided_coefficients(guide, probs, radius, eps), guide)


def guided_coefficients(guide: Tensor, probs: Tensor, radius: int, eps: float = EPS) -> Tensor:
    """The guided filter's window means of ``a`` (3 channels) and ``b``, (4, h', w') float32.

    For a radius under ``2 * SUBSAMPLE_RADIUS`` they are fitted at the maps' own (h, w);
    for a larger one on the maps area-averaged by ``radius // SUBSAMPLE_RADIUS`` (the fast
    guided filter, He and Sun 2015: the windows still span ``radius`` and the cost falls
    with the square of that factor, while :func:`apply_guided` keeps the edges of the
    guide it is given, at any resolution).

    Args:
        guide: (3, h, w) float32 colours in 0..1 (or any units, ``eps`` in their square);
            probs: (h, w) float32.
        radius: window radius in pixels; eps: the fit's regulariser.
    """
    factor = max(1, radius // SUBSAMPLE_RADIUS)
    if factor == 1:
        return _coefficients(guide, probs, radius, eps)
    h, w = probs.shape
    small = (max(1, round(h / factor)), max(1, round(w / factor)))
    # (the guide and the probabilities apart: a channel's area mean does not depend on the
    # others, and no (4, h, w) copy is made)
    return _coefficients(F.interpolate(guide[None], size=small, mode="area")[0],
                         F.interpolate(probs[None, None], size=small, mode="area")[0, 0],
                         max(1, round(radius / factor)), eps)


def apply_guided(coeffs: Tensor, guide: Tensor) -> Tensor:
    """(h, w) float32 ``a . I + b`` for a (3, h, w) ``guide`` ``I`` (colours in the fit's
    units) of the region the (4, h', w') :func:`guided_coefficients` were fitted on,
    upsampled bilinearly to (h, w) where smaller (both grids span the region)."""
    size = tuple(guide.shape[-2:])
    if tuple(coeffs.shape[-2:]) != size:
        coeffs = F.interpolate(coeffs[None], size=size, mode="bilinear", align_corners=False)[0]
    out = torch.addcmul(coeffs[3], coeffs[0], guide[0])
    return out.addcmul_(coeffs[1], guide[1]).addcmul_(coeffs[2], guide[2])


def _coefficients(guide: Tensor, probs: Tensor, radius: int, eps: float) -> Tensor:
    """(4, h, w) float32: the window means of the fit's ``a`` (3 channels) and ``b`` of
    :func:`guided_filter` (for the guide as given). The maps are centred first (the fit is
    unchanged by shifting I and p), so float32 running sums stay small."""
    centre = guide.mean((1, 2), keepdim=True)
    mean_of_probs = probs.mean()
    # The small maps' arithmetic in numpy (each step costs less than a torch call on these
    # few thousand values; the same float32 operations), the running sums in torch.
    guide_np, probs_np = guide.numpy(), probs.numpy()
    # the maps whose window means the fit needs, written into one (13, h, w) stack: I, p,
    # I p, and the six products of I's channels
    stack = np.empty((13, *probs_np.shape), np.float32)
    np.subtract(guide_np, centre.numpy(), out=stack[:3])
    np.subtract(probs_np, mean_of_probs.numpy(), out=stack[3])
    np.multiply(stack[:3], stack[3], out=stack[4:7])
    _pair_products(stack[:3], stack[7:])
    means = _box_mean(torch.from_numpy(stack), radius).numpy()
    mean_i, mean_p, mean_ip, cov = means[:3], means[3], means[4:7], means[7:]
    cov -= _pair_products(mean_i, stack[:6])  # (the stack is free: a scratch of 6 maps)
    for diagonal in (0, 3, 5):
        cov[diagonal] += np.float32(eps)
    ab = stack[6:10]  # a (3 channels) and b
    a = _solve3(cov, np.subtract(mean_ip, mean_i * mean_p, out=mean_ip), ab[:3])
    np.subtract(mean_p, (a * mean_i).sum(0), out=ab[3])
    coeffs = _box_mean(torch.from_numpy(ab), radius)
    values = coeffs.numpy()
    values[3] += mean_of_probs.numpy() - (values[:3] * centre.numpy()).sum(0)
    return coeffs


def colour_codes(pixels: Tensor | np.ndarray, levels: int = COLOUR_LEVELS) -> Tensor:
    """(h, w, 3) RGB 0..255 (uint8, or any real dtype) -> (h, w) int64 colour bins in
    ``[0, levels ** 3)``: each channel quantised to ``levels`` equal steps (for uint8 and
    ``levels`` a power of two up to 32, by shifts in numpy: ``v * levels // 256``, the same
    bins, cheaper on a box's small arrays; the three levels are combined by one float32
    matrix-vector product, exact on integers below 2 ** 15)."""
    levels = int(levels)
    bits = levels.bit_length() - 1
    uint8 = pixels.dtype in (np.uint8, torch.uint8)
    if uint8 and levels >= 1 and levels == 1 << bits and bits <= 5:
        q = (np.asarray(pixels) >> (8 - bits)).astype(np.float32)
        weights = np.array([levels * levels, levels, 1], np.float32)
        return torch.from_numpy((q @ weights).astype(np.int64))
    pixels = torch.as_tensor(pixels)
    q = (pixels.float().clamp(0, 255) * (levels / 256)).long().clamp_(max=levels - 1)
    return (q[..., 0] * levels + q[..., 1]) * levels + q[..., 2]


def histogram_distance(first: Tensor | np.ndarray, second: Tensor | np.ndarray) -> float:
    """The total variation distance of two (bins,) non-negative histograms, each normalised
    to sum 1, in [0, 1] (0 when either is empty)."""
    first, second = np.asarray(first, np.float64), np.asarray(second, np.float64)
    total_first, total_second = first.sum(), second.sum()
    if not total_first or not total_second:
        return 0.0
    return float(np.abs(first / total_first - second / total_second).sum() / 2)


def colour_model(probs: Tensor, codes: Tensor, inside: np.ndarray,
                 weight: float | None = None) -> Tensor:
    """The network's probabilities combined with a colour model of its own mask.

    Two colour histograms are counted over the region: the object's, each pixel in the box
    weighted by its probability ``p``; the background's, weighted by ``1 - p`` in the box
    and by 1 in the margin (a box prompt is tight: what lies outside it is background).
    Each pixel's logit then gains ``weight * d`` times the log-ratio of its colour's two
    frequencies (one pseudo-count per colour; naive Bayes with the network as the prior),
    with ``d`` in [0, 1] the total variation distance of the two histograms: colours that
    tell object from background (``d`` near 1) move the mask; a dim object in noise, whose
    colours the background shares, keeps the network's mask (on a small region, a few
    hundred pixels over 512 colours, ``d`` of pure noise is still 0.3-0.7, which the
    pseudo-counts keep to small shifts). A ring's hole or a gap
    between an object's parts, drawn in the background's colours, is cut out of a mask
    the network filled, and an object's colour the network missed is added. On the nuclei
    and synthetic training splits' boxes this raised the mean IoU
    (``benchmarks/prompted_quality.py``).

    Args:
        probs: (h, w) float32 probabilities over a region.
        codes: (h, w) int64 :func:`colour_codes` of the region's pixels.
        inside: (h, w) bool, the region's pixels inside the box.
        weight: the log-ratio's weight at ``d = 1`` (default ``COLOUR_WEIGHT``).

    Returns:
        (h, w) float32 probabilities (``probs`` itself when ``weight`` is 0 or no pixel is
        inside the box).
    """
    weight = COLOUR_WEIGHT if weight is None else weight
    if not weight or not inside.any():  # no colour model, or no object side to learn
        return probs
    bins = COLOUR_LEVELS ** 3
    # numpy: cheaper than torch on a box's small arrays
    p = np.clip(probs.float().numpy(), np.float32(PROB_EPS), np.float32(1 - PROB_EPS))
    flat = codes.numpy().reshape(-1)
    object_weights = np.where(inside, p, np.float32(0)).reshape(-1)
    fore = np.bincount(flat, object_weights, bins)
    back = np.bincount(flat, minlength=bins) - fore  # 1 - p in the box, 1 outside
    weight = weight * histogram_distance(fore, back)
    ratio = np.log((fore + 1) / (fore.sum() + bins)) - np.log((back + 1) / (back.sum() + bins))
    # sigmoid(logit(p) + s) = p / (p + (1 - p) exp(-s)): one exp per colour, none per pixel
    out = np.exp(-weight * ratio).astype(np.float32).take(codes.numpy())
    out *= 1 - p
    out += p
    return torch.from_numpy(np.divide(p, out, out=out))


class BoxView(NamedTuple):
    """One box's region at its own pixels, or on a grid of about ``GRID_PIXELS`` cells when
    it has more than ``FULL_PIXELS``: what the score reads; and the region's probabilities
    at full resolution, what the mask is cut from, where it has at most ``REFINE_PIXELS``.

    Attributes:
        region: (y0, x0, y1, x1) original pixels.
        probs: (h, w) float32 probabilities on the grid (refined, when they were).
        network: (h, w) float32 the network's own probabilities on the grid (the sources'
            mean, before any refinement).
        pixels: (h, w, 3) float32 RGB 0..255 on the grid (area-averaged when smaller).
        codes: (h, w) int64 :func:`colour_codes` of ``pixels``.
        inside: (h, w) bool, the grid cells whose centre lies inside the box.
        mask_probs: (y1 - y0, x1 - x0) float32 probabilities at full resolution (refined,
            when they were), or ``None``: a larger region, or not asked for.
    """

    region: tuple[int, int, int, int]
    probs: Tensor
    network: Tensor
    pixels: Tensor
    codes: Tensor
    inside: np.ndarray
    mask_probs: Tensor | None


def grid_inside(region: tuple[int, int, int, int], size: tuple[int, int],
                box: np.ndarray) -> np.ndarray:
    """(h, w) bool: the cells of a ``size`` grid over ``region`` whose centre lies inside
    the XYXY ``box``."""
    y0, x0, y1, x1 = region
    ys = y0 + (np.arange(size[0]) + 0.5) * (y1 - y0) / size[0]
    xs = x0 + (np.arange(size[1]) + 0.5) * (x1 - x0) / size[1]
    return ((ys > box[1]) & (ys < box[3]))[:, None] & ((xs > box[0]) & (xs < box[2]))


def box_view(array: np.ndarray, sources: Sequence[Source], box: np.ndarray,
             refine: bool = True, mask: bool = True) -> BoxView:
    """One box's :class:`BoxView`: the mean of ``sources`` (a box seen more than once, e.g.
    mirrored); when ``refine`` and the region has at most ``REFINE_PIXELS`` pixels, combined
    with the region's colour model (:func:`colour_model`) on the grid, then guided-filtered
    where the box is at least ``MIN_SIDE`` px: the filter fitted on the grid (or coarser)
    and applied with the grid's colours (``probs``) and with the full-resolution ones
    (``mask_probs``), so the mask follows the image's own edges.

    Args:
        array: (H, W, 3) uint8 RGB image.
        sources: one or more :class:`Source` of the box.
        box: (4,) XYXY original pixels.
        refine: refine the probabilities; mask: compute ``mask_probs`` (where the region
            has at most ``REFINE_PIXELS`` pixels).
    """
    height, width = array.shape[:2]
    side = math.sqrt(max(float(box[2] - box[0]), 0.0) * max(float(box[3] - box[1]), 0.0))
    region = box_region(box, (height, width))
    y0, x0, y1, x1 = region
    full = (y1 - y0, x1 - x0)
    fits = full[0] * full[1] <= REFINE_PIXELS
    size = grid_size(full, box)
    network = _mean_probs(sources, region, width, size)
    crop = array[y0:y1, x0:x1]
    pixels = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float()
    grid = pixels if size == full else F.interpolate(pixels[None], size=size, mode="area")[0]
    inside = grid_inside(region, size, box)
    codes = colour_codes(crop if size == full else grid.permute(1, 2, 0))
    probs, mask_probs = network, None
    if refine and fits:
        probs = colour_model(network, codes, inside)
        if side >= MIN_SIDE:
            scale = math.sqrt(size[0] * size[1] / (full[0] * full[1]))  # cells per pixel
            radius = max(1, round(RADIUS_FRACTION * side * scale))
            # fitted on the colours in 0..255 with the regulariser scaled to match: the fit on
            # colours in 0..1, without their full-size copies
            coeffs = guided_coefficients(grid, probs, radius, EPS * 255 ** 2)
            probs = apply_guided(coeffs, grid)
            if mask:
                mask_probs = probs if size == full else apply_guided(coeffs, pixels)
        elif mask:
            mask_probs = probs if size == full else F.interpolate(
                probs[None, None], size=full, mode="bilinear", align_corners=False)[0, 0]
    elif mask and fits:
        mask_probs = network if size == full else _mean_probs(sources, region, width, full)
    return BoxView(region, probs, network, grid.permute(1, 2, 0), codes, inside, mask_probs)


def grid_size(full: tuple[int, int], box: np.ndarray) -> tuple[int, int]:
    """(h, w) of the grid a region of ``full`` (h, w) pixels is seen on: ``full`` itself up
    to ``FULL_PIXELS`` pixels, else about ``GRID_PIXELS`` cells, the same scale on both
    axes, except that an axis keeps at least ``MIN_BOX_CELLS`` cells across the XYXY ``box``
    (at most its pixels: a very thin box is not lost between cell centres)."""
    if full[0] * full[1] <= FULL_PIXELS:
        return full
    factor = math.sqrt(GRID_PIXELS / (full[0] * full[1]))
    extents = (float(box[3] - box[1]), float(box[2] - box[0]))
    return tuple(min(n, max(1, round(n * factor), math.ceil(n * MIN_BOX_CELLS / max(e, 1e-6))))
                 for n, e in zip(full, extents))  # type: ignore[return-value]


def _mean_probs(sources: Sequence[Source], region: tuple[int, int, int, int], width: int,
                size: tuple[int, int]) -> Tensor:
    """(h, w) float32 mean of the sources' :func:`box_probs` on a ``size`` grid (one
    source's own, without the no-op sum and division)."""
    if len(sources) == 1:
        return box_probs(sources[0], region, width, size)
    return sum(box_probs(s, region, width, size) for s in sources) / len(sources)


def view_mask(view: BoxView, threshold: float) -> np.ndarray:
    """(h, w) bool on the view's grid: its probabilities above ``threshold`` inside the box
    (what :mod:`serving.inference.quality` scores)."""
    return (view.probs.numpy() > threshold) & view.inside


def region_mask(view: BoxView, box: np.ndarray, image_size: tuple[int, int],
                threshold: float, grid_mask: np.ndarray | None = None) -> InstanceMasks:
    """One mask of the (H, W) image from a view's ``mask_probs``: those above ``threshold``
    inside the XYXY ``box``, cut to its True pixels (``grid_mask``: :func:`view_mask` at
    ``threshold``, where the caller has it: the same pixels where the view's grid is the
    region's own pixels)."""
    if view.mask_probs is None:
        raise ValueError("region_mask needs a view with full-resolution probabilities")
    if grid_mask is not None and view.mask_probs is view.probs:
        return InstanceMasks.from_dense(grid_mask[None], view.region[:2], image_size)
    size = tuple(view.mask_probs.shape)
    inside = view.inside if view.inside.shape == size else grid_inside(view.region, size, box)
    return InstanceMasks.from_dense(((view.mask_probs.numpy() > threshold) & inside)[None],
                                    view.region[:2], image_size)
