"""Per-box scale for box-prompted masks: every box segmented at a scale that puts it among the
sizes of the model's training objects.

A model sees objects of the sizes it was trained on best: ``object_sizes`` in its calibration
(:mod:`serving.inference.domain`) holds the training boxes' ``sqrt(w * h)`` at the network
input. Today's path resizes the whole image once to the model's size, which puts an 8 px box
of a 4000 px photo at 0.5 px and makes the user guess an ``--image-size``. Here each box gets
a scale ``r`` (input pixels per original pixel): today's where that puts it within the
training objects' p10-p90 sizes, else the one that puts it at the nearer of the two, at most
``max_upsample`` (:func:`box_scales`; aiming every box at the median measured worse,
``benchmarks/prompted_quality.py``). The boxes of an image whose
scales lie close to the image's median scale share one run of the *whole image* at that
scale (all the context, one forward pass; :func:`scale_groups`), provided it is not larger
than ``WHOLE_IMAGE_PIXELS`` model inputs; every other box gets a *crop*: the box with
``CONTEXT`` times its size on each side (at least ``MIN_MARGIN`` input pixels), resized by its
``r``, zero-padded to a multiple of 32. Both go through the backend's own box-prompted entry
point (:meth:`serving.backends.Backend.segment_boxes`), so every backend and every earlier
export runs them unchanged; crops of one canvas size run as one batch of at most
``CROP_BATCH``. Masks come back through the same stride-4 -> original pipeline as the whole
image (:func:`serving.inference.paste.mask_crops`), as tight crops.

Each mask is refined at full resolution inside its box (:mod:`serving.inference.refine`)
and scored by :func:`serving.inference.quality.quality_score`. A mask the model leaves empty
falls back to its most likely pixels and scores 0 (``BoxScaleOptions.fallback``).

All geometry is in pixels: original-image XYXY for boxes and windows, network-input XYXY
inside a crop's canvas.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from statistics import fmean
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..masks import InstanceMasks, is_empty
from ..model.card import Calibration
from . import domain, quality, refine
from .paste import mask_crops
from .transforms import SIZE_DIVISIBILITY, canvas_size, image_batch, resized_shape

#: Context on each side of a box, in units of the box's size ``sqrt(w * h)``.
CONTEXT = 1.0
#: Context on each side is at least this many network-input pixels.
MIN_MARGIN = 16
#: Boxes within this factor of their image's median scale share one whole-image run.
GROUP_FACTOR = 2.0
#: The whole image at a box group's scale may have at most this many times the pixels of
#: the model's own input size (``max_size`` squared); beyond it boxes are cropped.
WHOLE_IMAGE_PIXELS = 4.0
#: Crops per backend call (the TensorRT engines' default profile allows batches up to 8).
CROP_BATCH = 8
#: Prompt boxes whose crops are held at once (bounds memory for many boxes).
BOX_CHUNK = 32
#: The fallback threshold of a collapsed mask, as a fraction of its highest probability.
FALLBACK_RATIO = 0.5


class Crop(NamedTuple):
    """One (box, scale) candidate: where its crop lies and how it is resized.

    Attributes:
        box: index of the prompt box.
        scale: input pixels per original pixel (``r``), as asked.
        window: (x0, y0, x1, y1) int original-pixel window of the crop.
        resized: (h, w) of the resized crop at the network input.
        input_box: (4,) float32 XYXY prompt box in the crop's input frame.
    """

    box: int
    scale: float
    window: tuple[int, int, int, int]
    resized: tuple[int, int]
    input_box: np.ndarray


class CropResult(NamedTuple):
    """What the backend says about one crop: its (H/4, W/4) float32 stride-4 mask
    probabilities of the crop's canvas, its box score and its (predicted or given) label."""

    probs: Tensor
    score: float
    label: int


def trained_sizes(calibration: Calibration) -> tuple[float, float, float] | None:
    """The training objects' ``sqrt(w * h)`` at the network input, (p10, p50, p90), or
    ``None`` when the model carries no calibration (then today's whole-image scale is used)."""
    sizes = calibration.object_sizes
    if not all(sizes.get(k) for k in ("p10", "p50", "p90")):
        return None
    return float(sizes["p10"]), float(sizes["p50"]), float(sizes["p90"])


def box_side(boxes: np.ndarray) -> np.ndarray:
    """(M, 4) XYXY boxes -> (M,) float64 ``sqrt(w * h)`` (:func:`.domain.box_side`), at
    least 1 px so that a scale can be aimed from it."""
    return np.maximum(domain.box_side(boxes), 1.0)


@dataclass(frozen=True)
class BoxScaleOptions:
    """How :func:`segment_per_box` scales each box (the defaults are the product's).

    Attributes:
        fit: ``"range"`` moves a box only when it lies outside the training objects' p10-p90
            sizes at today's scale, to the nearer bound; ``"median"`` aims every box at
            ``target`` times the training objects' median size.
        target: the factor of ``fit="median"``.
        max_upsample: at most this many input pixels per original pixel (blown-up tiny boxes
            are blurry, unlike anything in training; 1.5 was better than 2 on the nuclei
            training split's boxes and equal on the synthetic one's).
        group: boxes whose scales lie within ``GROUP_FACTOR`` of their image's median scale
            share one run of the whole image at that median scale (context, and one forward
            pass); ``False`` segments every box in its own crop.
        context: context on each side of a cropped box, in units of its size.
        fallback: a mask that is empty or near-empty (:func:`serving.masks.is_empty`) is
            thresholded again at ``FALLBACK_RATIO`` of its highest probability in the box
            (the model's most likely pixels instead of nothing); it scores 0.
        refine: each mask refined at full resolution inside its box, guided by the image's
            colours (:mod:`serving.inference.refine`; only with ``clip_to_box``).
        flip: the image also runs flipped left-right and each box's probabilities are the
            mean of the two (test-time flip: twice the network's time).
    """

    fit: str = "range"
    target: float = 1.0
    max_upsample: float = 1.5
    group: bool = True
    context: float = CONTEXT
    fallback: bool = True
    refine: bool = True
    flip: bool = False


def box_scales(boxes: np.ndarray, model_scale: float,
               sizes: tuple[float, float, float] | None,
               options: BoxScaleOptions = BoxScaleOptions()) -> np.ndarray:
    """Each box's scale (input pixels per original pixel), at most ``max_upsample``.

    Args:
        boxes: (M, 4) XYXY original pixels.
        model_scale: today's whole-image scale.
        sizes: :func:`trained_sizes` (p10, p50, p90); ``None``: ``model_scale`` for all.

    Returns:
        (M,) float64 scales: with ``fit="range"``, ``model_scale`` where it puts the box
        (``sqrt(w * h)``) within p10..p90, else the scale that puts it at the nearer bound;
        with ``fit="median"``, the scale that puts it at ``target * p50``.
    """
    sides = box_side(boxes)
    if sizes is None:
        return np.full(len(sides), float(model_scale))
    p10, p50, p90 = sizes
    if options.fit == "median":
        scales = options.target * p50 / sides
    else:
        scales = np.clip(np.full(len(sides), float(model_scale)), p10 / sides, p90 / sides)
    return np.minimum(scales, options.max_upsample)


def scale_groups(scales: np.ndarray, image_size: tuple[int, int], pixel_limit: float,
                 options: BoxScaleOptions = BoxScaleOptions(),
                 ) -> tuple[float | None, np.ndarray]:
    """Which boxes share one run of the whole image, and at what scale.

    The image's scale is the geometric median of its boxes' ``scales``; boxes within
    ``GROUP_FACTOR`` of it join the whole-image run, provided the image at that scale has at
    most ``pixel_limit`` pixels. Returns ``(scale, (M,) bool members)``, or ``(None, all
    False)`` when every box is cropped.
    """
    none = (None, np.zeros(len(scales), bool))
    if not options.group or not len(scales):
        return none
    scale = float(np.exp(np.median(np.log(scales))))
    if image_size[0] * image_size[1] * scale ** 2 > pixel_limit:
        return none
    return scale, np.abs(np.log(scales / scale)) <= math.log(GROUP_FACTOR)


def plan_crop(index: int, box: np.ndarray, scale: float, image_size: tuple[int, int],
              max_size: int, context: float = CONTEXT) -> Crop:
    """The crop of ``box`` (XYXY original pixels) at ``scale``: the box plus ``CONTEXT``
    times its size (at least ``MIN_MARGIN`` input pixels) on each side, clipped to the
    (H, W) image, resized by ``scale`` (lowered where the crop would exceed ``max_size``)."""
    height, width = image_size
    x1, y1, x2, y2 = (float(v) for v in box)
    margin = max(context * float(box_side(box)[0]), MIN_MARGIN / scale)
    x0, y0 = max(0, math.floor(x1 - margin)), max(0, math.floor(y1 - margin))
    xe, ye = min(width, math.ceil(x2 + margin)), min(height, math.ceil(y2 + margin))
    xe, ye = max(xe, x0 + 1), max(ye, y0 + 1)
    r = min(scale, max_size / max(xe - x0, ye - y0))
    rh, rw = max(1, round((ye - y0) * r)), max(1, round((xe - x0) * r))
    sx, sy = rw / (xe - x0), rh / (ye - y0)
    input_box = np.array([(x1 - x0) * sx, (y1 - y0) * sy, (x2 - x0) * sx, (y2 - y0) * sy],
                         np.float32)
    return Crop(index, float(scale), (x0, y0, xe, ye), (rh, rw), input_box)


def run_crops(backend: Any, array: np.ndarray, crops: Sequence[Crop],
              labels: np.ndarray) -> list[CropResult]:
    """Every crop through ``backend.segment_boxes``, crops of one canvas batched together
    (at most ``CROP_BATCH`` per call); one :class:`CropResult` per crop, in order.

    Args:
        array: (H, W, 3) uint8 RGB image.
        labels: (M,) int64 class per prompt box (-1: predicted).
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for i, crop in enumerate(crops):
        groups.setdefault(canvas_size(*crop.resized, SIZE_DIVISIBILITY), []).append(i)
    results: list[CropResult | None] = [None] * len(crops)
    for canvas, members in groups.items():
        for start in range(0, len(members), CROP_BATCH):
            chunk = members[start:start + CROP_BATCH]
            windows = [crops[i].window for i in chunk]
            batch = image_batch([array[y0:y1, x0:x1] for x0, y0, x1, y1 in windows],
                                [crops[i].resized for i in chunk], canvas)
            boxes = torch.from_numpy(np.stack([crops[i].input_box for i in chunk]))[:, None]
            box_labels = torch.from_numpy(
                np.array([[labels[crops[i].box]] for i in chunk], dtype=np.int64))
            out = backend.segment_boxes(batch, [crops[i].resized for i in chunk], boxes,
                                        box_labels)
            for b, i in enumerate(chunk):
                results[i] = CropResult(out.mask_probs[b, 0].float().cpu(),
                                        float(out.scores[b, 0]), int(out.labels[b, 0]))
    return results  # type: ignore[return-value]


def paste_crop(result: CropResult, crop: Crop, box: np.ndarray | None,
               image_size: tuple[int, int], threshold: float) -> InstanceMasks:
    """The crop's mask in the (H, W) original image: the same stride-4 -> original pipeline as
    the whole image (:func:`serving.inference.paste.mask_crops`) applied to the crop's window,
    clipped to ``box`` (XYXY original pixels; ``None``: not clipped), placed at the window's
    offset. One mask."""
    x0, y0, x1, y1 = crop.window
    clip_box = None
    if box is not None:
        clip_box = np.asarray(box, np.float32).reshape(1, 4) - np.array([x0, y0, x0, y0],
                                                                           np.float32)
    part = mask_crops(result.probs[None], crop.resized, (y1 - y0, x1 - x0), threshold,
                      clip_boxes=clip_box)
    return InstanceMasks(part.crops, part.offsets + np.array([[y0, x0]]), image_size)


class BoxMasks(NamedTuple):
    """Box-prompted results of one image: ``masks`` (M masks of the (H, W) image), ``scores``
    (M,) float32 quality scores in [0, 1] and ``labels`` (M,) int64, in prompt order."""

    masks: InstanceMasks
    scores: np.ndarray
    labels: np.ndarray


class FinalMask(NamedTuple):
    """A box's mask in the original image, whether it fell back, the box's
    :class:`serving.inference.refine.BoxView` (what the score reads) and, where it was
    computed, its :func:`serving.inference.refine.view_mask` (h, w) bool (else ``None``)."""

    mask: InstanceMasks
    fell_back: bool
    view: refine.BoxView
    grid_mask: np.ndarray | None = None


def final_mask(pairs: Sequence[tuple[Crop, CropResult]], box: np.ndarray, array: np.ndarray,
               cfg: Any, options: BoxScaleOptions) -> FinalMask:
    """A box's mask from its candidates ``pairs`` (the image's, then the mirrored image's
    with ``options.flip``; their probabilities are averaged).

    With ``options.refine`` or ``options.flip`` (and ``cfg.clip_to_box``, and a box region
    of at most ``refine.REFINE_PIXELS`` pixels) the mask is the threshold of the box's
    :func:`serving.inference.refine.box_view` inside ``box``; otherwise :func:`paste_crop`
    of the first candidate (clipped to ``box`` when ``cfg.clip_to_box``). With
    ``options.fallback``, an empty or near-empty mask is thresholded again, unrefined, at
    ``FALLBACK_RATIO`` of its highest stride-4 probability in the box (the candidates'
    mean)."""
    image_size = array.shape[:2]
    crop, result = pairs[0]
    sources = [refine.Source(r.probs, c.window, c.resized, k > 0)
               for k, (c, r) in enumerate(pairs)]
    # refined only where its mask is the one returned (the score reads the view)
    cut = cfg.clip_to_box and (options.refine or options.flip)
    view = refine.box_view(array, sources, box, options.refine and cfg.clip_to_box, mask=cut)
    if cut and view.mask_probs is not None:
        grid_mask = refine.view_mask(view, cfg.mask_threshold)  # (the score's mask too)
        mask = refine.region_mask(view, box, image_size, cfg.mask_threshold, grid_mask)
        if not (options.fallback and is_empty(int(mask.areas()[0]), box)):
            return FinalMask(mask, False, view, grid_mask)
        raw = refine.box_view(array, sources, box, False) if options.refine else view
        return FinalMask(refine.region_mask(raw, box, image_size, fallback_threshold(pairs, cfg)),
                         True, view, grid_mask)
    clip = box if cfg.clip_to_box else None
    mask = paste_crop(result, crop, clip, image_size, cfg.mask_threshold)
    if not (options.fallback and is_empty(int(mask.areas()[0]), box)):
        return FinalMask(mask, False, view)
    return FinalMask(paste_crop(result, crop, clip, image_size, fallback_threshold(pairs, cfg)),
                     True, view)


def fallback_threshold(pairs: Sequence[tuple[Crop, CropResult]], cfg: Any) -> float:
    """The threshold of a collapsed mask: ``FALLBACK_RATIO`` of the candidates' mean highest
    stride-4 probability inside the box, at most ``cfg.mask_threshold`` (read only for the
    few masks that fall back)."""
    peak = fmean(float(quality.box_cells(r.probs, c.input_box).max()) for c, r in pairs)
    return min(cfg.mask_threshold, FALLBACK_RATIO * peak)


def run_whole(backend: Any, array: np.ndarray, size: tuple[int, int], members: np.ndarray,
              boxes: np.ndarray, labels: np.ndarray, chunk: int,
              ) -> list[tuple[Crop, CropResult]]:
    """The boxes ``members`` (indices) segmented in the whole image resized to ``size``
    (h, w), ``chunk`` boxes per backend call; one (crop covering the whole image, result)
    per box."""
    height, width = array.shape[:2]
    scale = size[0] / height
    batch = image_batch([array], [size])
    factors = np.array([size[1] / width, size[0] / height] * 2, np.float32)
    out = []
    for start in range(0, len(members), chunk):
        part = members[start:start + chunk]
        inputs = (boxes[part] * factors).astype(np.float32)
        res = backend.segment_boxes(batch, [size], torch.from_numpy(inputs)[None],
                                    torch.from_numpy(labels[part].astype(np.int64))[None])
        for k, i in enumerate(part):
            crop = Crop(int(i), scale, (0, 0, width, height), size, inputs[k])
            out.append((crop, CropResult(res.mask_probs[0, k].float().cpu(),
                                         float(res.scores[0, k]), int(res.labels[0, k]))))
    return out


def _candidates(backend: Any, array: np.ndarray, boxes: np.ndarray, labels: np.ndarray,
                cfg: Any, scales: np.ndarray, options: BoxScaleOptions,
                ) -> Iterator[list[tuple[Crop, CropResult]]]:
    """The boxes' candidates in chunks: first the :func:`scale_groups` group's, run together
    in the whole image at the group's scale, then the others', each in a crop with context
    (``BOX_CHUNK`` boxes at a time). A mirrored image with mirrored boxes gives the same
    chunks in the same order."""
    height, width = array.shape[:2]
    model_size = resized_shape(height, width, cfg.min_size, cfg.max_size)
    limit = max(WHOLE_IMAGE_PIXELS * cfg.max_size ** 2, model_size[0] * model_size[1])
    scale, members = scale_groups(scales, (height, width), limit, options)
    if scale is not None:
        index = np.flatnonzero(members)
        # as many boxes per call as today's path holds probabilities for at the model's size,
        # and at most the boxes one forward pass takes (an exported model's box dimension)
        chunk = max(BOX_CHUNK, int(len(index) * model_size[0] * model_size[1]
                                   / (height * width * scale ** 2)))
        chunk = min(chunk, max(int(cfg.max_prompt_boxes), 1))
        size = model_size if abs(scale * height / model_size[0] - 1) < 1e-6 else (
            max(8, round(height * scale)), max(8, round(width * scale)))
        yield run_whole(backend, array, size, index, boxes, labels, chunk)
    cropped = np.flatnonzero(~members)
    for start in range(0, len(cropped), BOX_CHUNK):
        crops = [plan_crop(int(i), boxes[i], float(scales[i]), (height, width), cfg.max_size,
                           options.context) for i in cropped[start:start + BOX_CHUNK]]
        yield list(zip(crops, run_crops(backend, array, crops, labels), strict=True))


def mirror_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """(M, 4) XYXY boxes of an image ``width`` px wide -> the same boxes in the image flipped
    left-right."""
    out = np.array(boxes, np.float32, copy=True)
    out[:, 0], out[:, 2] = width - boxes[:, 2], width - boxes[:, 0]
    return out


def segment_per_box(backend: Any, array: np.ndarray, boxes: np.ndarray, labels: np.ndarray,
                    cfg: Any, sizes: tuple[float, float, float] | None,
                    options: BoxScaleOptions = BoxScaleOptions()) -> BoxMasks:
    """One mask per prompt box, each at its :func:`box_scales` scale.

    Boxes of one :func:`scale_groups` group run together in the whole image at the group's
    scale; the others each in a crop with context (``BOX_CHUNK`` boxes at a time). With
    ``options.flip`` the mirrored image runs too and the probabilities are averaged; with
    ``options.refine`` each mask is refined at full resolution inside its box
    (:mod:`serving.inference.refine`).

    Args:
        backend: any :class:`serving.backends.Backend`.
        array: (H, W, 3) uint8 RGB image.
        boxes: (M, 4) float32 XYXY original pixels; labels: (M,) int64 (-1: predict).
        cfg: the ``InferenceConfig`` (``min_size``, ``max_size``, ``mask_threshold``,
            ``clip_to_box``, ``max_prompt_boxes``: the most boxes one backend call takes).
        sizes: :func:`trained_sizes` of the model.

    Returns:
        :class:`BoxMasks` with :func:`serving.inference.quality.quality_score` scores; a mask
        that fell back (the model's own mask was empty) scores exactly 0, which ``sim label``
        flags ``sim_empty``.
    """
    height, width = array.shape[:2]
    model_size = resized_shape(height, width, cfg.min_size, cfg.max_size)
    scales = box_scales(boxes, model_size[0] / height, sizes, options)
    crowded = quality.crowding(boxes)
    masks: list[InstanceMasks | None] = [None] * len(boxes)
    scores, out_labels = np.zeros(len(boxes), np.float32), np.zeros(len(boxes), np.int64)
    runs: list[Iterator[list[tuple[Crop, CropResult]]]] = [
        _candidates(backend, array, boxes, labels, cfg, scales, options)]
    if options.flip:
        runs.append(_candidates(backend, np.ascontiguousarray(array[:, ::-1]),
                                mirror_boxes(boxes, width), labels, cfg, scales, options))
    for chunks in zip(*runs, strict=True):
        for pairs in zip(*chunks, strict=True):
            k = pairs[0][0].box
            final = final_mask(pairs, boxes[k], array, cfg, options)
            masks[k] = final.mask
            scores[k] = 0.0 if final.fell_back else quality.quality_score(
                pairs, final.view, cfg.mask_threshold, float(crowded[k]), final.grid_mask)
            out_labels[k] = pairs[0][1].label
    return BoxMasks(InstanceMasks.concatenate(masks), scores, out_labels)  # type: ignore[arg-type]
