"""The score of a box-prompted mask: how good the mask is likely to be.

Users sort labels by ``score`` to review the worst first, so it should rank masks by their
IoU with the true object. The model's box score alone ranks them poorly (Spearman 0.4-0.5 on
the nuclei and synthetic validation boxes, ``benchmarks/prompted_quality.py``). Here
:func:`quality_score` multiplies eight signs of a good mask, each in [0, 1]:

- ``sqrt`` of the model's box score (how sure it is that an object of the class is there);
- :func:`projection_coverage` of the network's own probabilities: the mean, over the box's
  rows and columns, of the highest probability along each, the soft form of the training's
  projection term (a box-supervised mask should reach every row and column of its box);
- the same of the final (refined) probabilities, squared;
- :func:`mask_confidence` of the final probabilities, squared: the mean ``|2p - 1|`` over
  the box (an undecided mask is a poor one);
- :func:`colour_separation` ``/ (colour_separation + SEPARATION_HALF)``: how far apart the
  mean colours of the mask and of the rest of the box and its margin lie;
- ``sqrt`` of :func:`colour_distance`: how different the two sides' colour histograms are
  (a textured object, e.g. striped, differs from its surroundings in which colours it
  holds rather than in their mean);
- :func:`boundary_sharpness` of the final probabilities, squared: how steeply they fall
  across the mask's outline, per network-input pixel (a mask that snapped to an edge
  versus one whose outline is a soft guess; at the box's edge, one cut off by the box);
- ``1 -`` :func:`crowding`, to the power ``CROWDING_POWER``: the box's highest IoU with
  another box of the same prompt. Where boxes overlap, the pixels they share could belong to
  either object, and an occluded object's visible part is what its mask should hold: on
  the synthetic training boxes the masks' mean IoU falls from 0.74 for boxes that overlap
  no other to 0.48 for those overlapping another at IoU 0.4 or more, which the first seven
  terms do not see (``benchmarks/results/prompted_quality_synthetic_crowding_train.md``;
  the nuclei's boxes barely overlap and it moves their ranking little). A box's score so
  depends on the other boxes prompted with it (all the boxes of an image in ``sim label``);
  a box given twice scores ``MIN_SCORE``.

The terms and their powers were chosen on the nuclei and synthetic training splits, never
on the validation splits, which are reported (``benchmarks/prompted_quality.py``): the first
six as the best smallest Spearman over both splits among products of powers 0, 1/2, 1, 2 of
these terms, of the network's own confidence and colour distance, and of the agreement of the
network's and the refined masks; the seventh, by the same rule, as the cheap term that raised
the smallest training Spearman most among those read from the box's view (the mask's share of
its box, its connected components and holes, the probabilities' entropy and their mass in the
margin, the image gradient along the outline, the box's size), with its power (2, among 1/2
to 4) fitted with the other six kept (refitting all seven together did worse on held-out
halves of the training images); the eighth's power (3, among 1/2 to 8) by the same rule
with the seven kept. A mask that fell back (the model's own mask was empty)
scores exactly 0 (:mod:`serving.inference.box_scale`), every other at least ``MIN_SCORE`` (a
box of one flat colour has no colour separation). A mask left unrefined (its region too large,
or refinement off) keeps the network's soft outline, so its sharpness is about 0.5 and it
ranks below refined masks of the same other terms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import fmean
from typing import Any

import numpy as np
from torch import Tensor

from ..masks import outline, true_window
from . import refine

#: Names this definition of the prompted score; a calibration's ``prompt_scores`` are
#: comparable with it only when its ``prompt_score`` says the same (older models: no name;
#: ``quality-2``: the same product without :func:`boundary_sharpness`; ``quality-3``:
#: without :func:`crowding`).
SCORE_VERSION = "quality-4"
#: The colour separation at which its factor in the score is 1/2.
SEPARATION_HALF = 0.25
#: The lowest score of a mask that did not fall back (0 is kept for those that did).
MIN_SCORE = 1e-6
#: The power of ``1 -`` a box's highest IoU with another box of its prompt in the score.
CROWDING_POWER = 3
#: Boxes :func:`crowding` takes at once, each group against the boxes it can meet: at most
#: this many rows of M IoUs in memory.
CROWDING_ROWS = 128


def box_cells(probs: Tensor, input_box: np.ndarray) -> Tensor:
    """The stride-4 probabilities whose cell centres lie inside ``input_box`` (XYXY input
    pixels), flattened (at least the one cell under the box centre)."""
    x1, y1, x2, y2 = (float(v) for v in input_box)
    h4, w4 = probs.shape[-2:]
    c0, c1 = max(0, math.ceil(x1 / 4 - 0.5)), min(w4, math.floor(x2 / 4 - 0.5) + 1)
    r0, r1 = max(0, math.ceil(y1 / 4 - 0.5)), min(h4, math.floor(y2 / 4 - 0.5) + 1)
    if c1 <= c0 or r1 <= r0:
        cy = min(h4 - 1, max(0, int((y1 + y2) / 8)))
        cx = min(w4 - 1, max(0, int((x1 + x2) / 8)))
        return probs[cy:cy + 1, cx:cx + 1].flatten()
    return probs[r0:r1, c0:c1].flatten()


def mask_confidence(probs: Tensor, inside: np.ndarray) -> float:
    """How decided the mask is inside its box, in [0, 1]: the mean of ``|2p - 1|`` over the
    box's pixels (1: every pixel certainly in or out; 0: every pixel at 0.5; 0 for no pixel).

    Args:
        probs: (h, w) float32 probabilities over a region (clamped to [0, 1]).
        inside: (h, w) bool, the region's pixels inside the box.
    """
    return _confidence(probs.numpy()[inside])


def _confidence(values: np.ndarray) -> float:
    """:func:`mask_confidence` of the box's float32 ``values`` (any shape; a C-contiguous
    copy is reduced as the flat array is)."""
    cells = np.clip(values, 0, 1)
    return float(np.abs(2 * cells - 1).mean()) if cells.size else 0.0


def projection_coverage(probs: Tensor, inside: np.ndarray) -> float:
    """The mean over the box's rows and columns of the highest probability along each, in
    [0, 1] (1: the mask reaches every row and column of its box).

    Args:
        probs: (h, w) float32 probabilities over a region (clamped to [0, 1]).
        inside: (h, w) bool, the region's pixels inside the box (a rectangle, as
            :func:`serving.inference.refine.grid_inside` gives).
    """
    window = true_window(inside)
    return 0.0 if window is None else _coverage(probs.numpy()[window])


def _coverage(values: np.ndarray) -> float:
    """:func:`projection_coverage` of the box's (h, w) float32 ``values``."""
    # (the clip commutes with the maxima: applied after them, to a row and a column of values)
    row_max, col_max = np.clip(values.max(1), 0, 1), np.clip(values.max(0), 0, 1)
    return float((row_max.mean() + col_max.mean()) / 2)


def boundary_sharpness(probs: Tensor, mask: np.ndarray,
                       spacing: tuple[float, float] = (1.0, 1.0)) -> float:
    """How sharply the probabilities fall across the mask's outline, in [0, 1]: twice the
    mean gradient magnitude of ``probs`` per network-input pixel over the mask's boundary
    cells (those with a 4-neighbour outside the mask or the region), clipped to 1 (1: a
    step from 0 to 1 within one input pixel; 0 for an empty mask). Measured per input
    pixel, not per original one, it reads the same for an image and the same image
    upscaled (the box is seen at the same input size): the network's stride-4 output,
    upsampled, ramps over about 4 input pixels (about 0.5), a refined mask that snapped to
    a colour edge is sharper.

    Where the mask meets its box's edge, the probabilities just outside the box count: an
    object that ends at the box's edge keeps the score, a mask cut off by the box (the
    network reached beyond it) lowers it.

    Args:
        probs: (h, w) float32 probabilities over a region; mask: (h, w) bool.
        spacing: network-input pixels per cell of ``probs`` along each axis
            (:func:`input_spacing`).
    """
    boundary = outline(mask)
    if not boundary.any():
        return 0.0
    # np.gradient (central differences, one-sided at the region's border) at the boundary
    # cells only
    values = np.asarray(probs)
    # (np.nonzero of a 2-D array is several times slower than through the flat indices)
    at = np.divmod(np.flatnonzero(boundary), boundary.shape[1])
    squared = np.zeros(len(at[0]))
    for axis in (0, 1):
        n = values.shape[axis]
        if n > 1:
            lo, hi = list(at), list(at)
            lo[axis], hi[axis] = np.maximum(at[axis] - 1, 0), np.minimum(at[axis] + 1, n - 1)
            step = (hi[axis] - lo[axis]) * max(spacing[axis], 1e-6)
            diff = values[tuple(hi)].astype(np.float64) - values[tuple(lo)].astype(np.float64)
            squared += (diff / step) ** 2
    return float(min(1.0, 2 * np.sqrt(squared).mean()))


def input_spacing(pairs: Sequence[tuple[Any, Any]], view: refine.BoxView,
                  ) -> tuple[float, float]:
    """Network-input pixels per cell of ``view``'s grid along (y, x): the candidates' mean
    scale (their crop's input size over its original size) times the original pixels per
    cell (1 for a region seen at its own pixels)."""
    y0, x0, y1, x1 = view.region
    h, w = view.probs.shape[-2:]
    sy = fmean([c.resized[0] / max(c.window[3] - c.window[1], 1) for c, _ in pairs])
    sx = fmean([c.resized[1] / max(c.window[2] - c.window[0], 1) for c, _ in pairs])
    return sy * (y1 - y0) / max(h, 1), sx * (x1 - x0) / max(w, 1)


def colour_separation(pixels: Tensor, mask: np.ndarray) -> float:
    """How far apart the colours of ``mask`` and of the rest lie, relative to their spread:
    ``|mean_in - mean_out|^2 / (var_in + var_out + 1)`` (RGB 0..255, variances summed over
    the channels; a Fisher criterion), 0 when either side has fewer than 2 pixels.

    Args:
        pixels: (h, w, 3) RGB 0..255 of a region (any real dtype); mask: (h, w) bool.
    """
    n_in = float(np.count_nonzero(mask))
    n_out = mask.size - n_in
    if n_in < 2 or n_out < 2:
        return 0.0
    # per side and channel: the sums of the values and of their squares, from one (6, N)
    # float64 array of the values and their squares (one matrix-vector product; numpy is
    # faster than torch on these small arrays)
    pixels = np.moveaxis(np.asarray(pixels), -1, 0).reshape(3, -1)
    rows = np.empty((6, pixels.shape[1]))
    np.copyto(rows[:3], pixels)
    np.square(rows[:3], out=rows[3:])
    inside = rows @ mask.reshape(-1).astype(np.float64)
    outside = np.einsum("cn->c", rows) - inside
    in_sum, in_sq, out_sum, out_sq = inside[:3], inside[3:], outside[:3], outside[3:]
    mean_in, mean_out = in_sum / n_in, out_sum / n_out
    var_in = (in_sq - n_in * mean_in ** 2) / (n_in - 1)
    var_out = (out_sq - n_out * mean_out ** 2) / (n_out - 1)
    gap = float(((mean_in - mean_out) ** 2).sum())
    return gap / (float(var_in.sum() + var_out.sum()) + 1.0)


def colour_distance(codes: Tensor, mask: np.ndarray) -> float:
    """The total variation distance between the colour histograms of ``mask`` and of the
    rest, in [0, 1] (0: the same colours in the same shares; 1: no colour in common; 0 when
    either side is empty).

    Args:
        codes: (h, w) int64 colour bins of a region (:func:`serving.inference.refine.colour_codes`).
        mask: (h, w) bool.
    """
    bins = refine.COLOUR_LEVELS ** 3
    # one count of (side, colour) pairs: the rest's histogram, then the mask's
    counts = np.bincount(np.asarray(codes).reshape(-1) + bins * mask.reshape(-1),
                         minlength=2 * bins)
    return refine.histogram_distance(counts[bins:], counts[:bins])


def crowding(boxes: np.ndarray) -> np.ndarray:
    """(M,) float64 in [0, 1]: each box's highest IoU with another box of the same prompt
    (0 for a box alone; 1 for a box given twice).

    The boxes are sorted by their left edge and taken ``CROWDING_ROWS`` at a time, each
    group against the boxes that can meet it along x only (those starting left of the
    group's right-most edge and ending right of its left-most start), so thousands of boxes
    spread over an image cost about linear time; pycocotools' IoU on the pairs.

    Args:
        boxes: (M, 4) XYXY, any one frame (original-image pixels).
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    # the index work in numpy (cheaper than torch on these short arrays)
    order = np.argsort(boxes[:, 0], kind="stable")
    boxes = boxes[order]
    best = np.zeros(len(boxes))
    for start in range(0, len(boxes), CROWDING_ROWS):
        rows = boxes[start:start + CROWDING_ROWS]
        end = int(np.searchsorted(boxes[:, 0], rows[:, 2].max()))  # left of the rows' right
        cols = np.flatnonzero(boxes[:end, 2] > rows[:, 0].min())  # right of their left
        if not len(cols):
            continue
        iou = _box_iou(rows, boxes[cols])
        iou[cols[None] == np.arange(start, start + len(rows))[:, None]] = 0  # not itself
        best[start:start + len(rows)] = iou.max(1)
    out = np.zeros(len(boxes))
    out[order] = best
    return out


def _box_iou(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """(M, N) float64 IoU of (M, 4) and (N, 4) float64 XYXY boxes, 0 where a box has no area:
    pycocotools' (C; torchvision's ``box_iou``, tensor operations, costs 25x more on the
    ten boxes of a prompt)."""
    from pycocotools import mask as mask_util  # lazy: a core dependency, imported on use

    def xywh(b: np.ndarray) -> np.ndarray:
        return np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)

    return np.asarray(mask_util.iou(xywh(first), xywh(second), np.zeros(len(second), np.uint8)),
                      np.float64).reshape(len(first), len(second))


def quality_score(pairs: Sequence[tuple[Any, Any]], view: refine.BoxView,
                  threshold: float, crowded: float = 0.0, mask: np.ndarray | None = None,
                  ) -> float:
    """The score of one box's mask, in [0, 1] (the module docstring).

    Args:
        pairs: the box's candidates, ``(Crop, CropResult)`` of
            :mod:`serving.inference.box_scale` (their box scores are averaged).
        view: the box's network and final probabilities and pixels over its region
            (:func:`serving.inference.refine.box_view`).
        threshold: the mask threshold.
        crowded: the box's :func:`crowding`, its highest IoU with another box of the prompt.
        mask: :func:`serving.inference.refine.view_mask` of ``view`` at ``threshold``, where
            the caller has it (default: computed).
    """
    score = fmean(float(r.score) for _, r in pairs)
    mask = refine.view_mask(view, threshold) if mask is None else mask
    window = true_window(view.inside)
    if window is None:
        return MIN_SCORE
    probs = view.probs.numpy()[window]
    separation = colour_separation(view.pixels, mask)
    value = (math.sqrt(max(score, 0.0) * colour_distance(view.codes, mask))
             * separation / (separation + SEPARATION_HALF)
             * _coverage(view.network.numpy()[window])
             * _coverage(probs) ** 2
             * _confidence(probs) ** 2
             * boundary_sharpness(view.probs, mask, input_spacing(pairs, view)) ** 2
             * (1.0 - crowded) ** CROWDING_POWER)
    return max(value, MIN_SCORE)
