"""Per-box scale for box-prompted masks: every box segmented in its own crop, at a scale the
model handles well, the best of a few scales kept and pasted back.

A model sees objects of the sizes it was trained on best: ``object_sizes`` in its calibration
(:mod:`serving.inference.domain`) holds the training boxes' ``sqrt(w * h)`` at the network
input. Resizing the whole image once (today's path) puts a 8 px box of a 4000 px photo at
0.5 px and a box filling the photo at the whole input; here each box gets a *crop*: the box
with ``CONTEXT`` times its size of context on each side (at least ``MIN_MARGIN`` input pixels),
resized by a per-box factor ``r`` (input pixels per original pixel), zero-padded to a multiple
of 32 and run through the backend's own box-prompted entry point
(:meth:`serving.backends.Backend.segment_boxes`), so every backend and every earlier export
runs it unchanged. Crops of one canvas size run as one batch of at most ``CROP_BATCH``.

Scales tried per box (:func:`candidate_scales`): the scale that maps the box to the training
objects' median size (``"trained"``) and the whole-image scale of today's path (``"model"``),
each kept only where it puts the box within the sizes the model handles (``MIN_INPUT_BOX`` ..
the input's ``max_size``). The candidate with the highest quality score
(:func:`quality_score`: the model's box score times the mask's confidence inside the box) is
kept. Memory: one batch of crops (``CROP_BATCH`` x canvas pixels) at a time, and the final
masks as tight crops (:class:`serving.masks.InstanceMasks`).

All geometry is in pixels: original-image XYXY for boxes and windows, network-input XYXY
inside a crop's canvas.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..masks import InstanceMasks, is_empty
from .paste import mask_crops
from .transforms import SIZE_DIVISIBILITY, canvas_size, resize_image, resized_shape

#: Context on each side of a box, in units of the box's size ``sqrt(w * h)``.
CONTEXT = 1.0
#: Context on each side is at least this many network-input pixels.
MIN_MARGIN = 16
#: A box smaller than this at the network input (``sqrt(w * h)``) is not tried at that scale.
MIN_INPUT_BOX = 8.0
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


def trained_size(calibration: Mapping[str, Any]) -> float | None:
    """The training objects' median ``sqrt(w * h)`` at the network input, or ``None`` when the
    model carries no calibration (then only today's whole-image scale is used)."""
    value = (calibration.get("object_sizes") or {}).get("p50")
    return float(value) if value else None


def box_side(boxes: np.ndarray) -> np.ndarray:
    """(M, 4) XYXY boxes -> (M,) float64 ``sqrt(w * h)`` (at least 1 px)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    w = np.clip(boxes[:, 2] - boxes[:, 0], 0, None)
    h = np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    return np.maximum(np.sqrt(w * h), 1.0)


@dataclass(frozen=True)
class BoxScaleOptions:
    """How :func:`segment_per_box` picks each box's scale (the defaults are the product's).

    Attributes:
        scales: the candidate scales, in order: ``"trained"`` (the box at the training
            objects' median size), ``"model"`` (today's whole-image scale), ``"half"`` (the box
            at half the median size).
        context: context on each side of a box, in units of its size ``sqrt(w * h)``.
        select: ``"quality"`` keeps the candidate with the best :func:`quality_score`,
            ``"score"`` the best model box score.
        fallback: a kept mask that is empty or near-empty (:func:`serving.masks.is_empty`) is
            thresholded again at ``FALLBACK_RATIO`` of its highest probability inside the box
            (the model's most likely pixels instead of nothing; its score stays low).
    """

    scales: tuple[str, ...] = ("trained", "model")
    context: float = CONTEXT
    select: str = "quality"
    fallback: bool = True


def candidate_scales(boxes: np.ndarray, model_scale: float, train_size: float | None,
                     max_size: int, options: BoxScaleOptions = BoxScaleOptions(),
                     ) -> list[list[float]]:
    """The scales tried for each box, in the order of ``options.scales``.

    Args:
        boxes: (M, 4) XYXY original pixels.
        model_scale: today's whole-image scale (input pixels per original pixel).
        train_size: :func:`trained_size` (``None``: only ``model_scale``).
        max_size: the model's longer-side cap; a box is never made larger than
            ``max_size / (1 + 2 * context)`` (its crop must fit the input).

    Returns:
        Per box, distinct scales (closer than 5 % counts as the same): ``"trained"`` is
        ``train_size / side`` (the box at the training objects' median size), ``"model"``
        ``model_scale`` where that puts the box at ``MIN_INPUT_BOX`` px or more. A box with no
        candidate left gets the trained scale (or, without calibration, ``MIN_INPUT_BOX``).
    """
    out = []
    cap = max_size / (1 + 2 * options.context)
    for side in box_side(boxes):
        wanted = {"trained": None if train_size is None else min(train_size, cap),
                  "half": None if train_size is None else min(train_size / 2, cap),
                  "model": side * model_scale if side * model_scale >= MIN_INPUT_BOX else None}
        sizes = [wanted[k] for k in options.scales if wanted.get(k) is not None]
        if not sizes:
            sizes = [min(train_size or MIN_INPUT_BOX, cap)]
        scales: list[float] = []
        for size in sizes:
            r = min(size, cap) / side
            if all(abs(math.log(r / q)) > 0.05 for q in scales):
                scales.append(r)
        out.append(scales)
    return out


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


def _crop_pixels(array: np.ndarray, crop: Crop) -> Tensor:
    """(3, h, w) float32 0-255 pixels of ``crop`` from the (H, W, 3) uint8 image."""
    x0, y0, x1, y1 = crop.window
    tensor = torch.from_numpy(np.array(array[y0:y1, x0:x1])).permute(2, 0, 1)
    return resize_image(tensor, crop.resized)


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
            batch = torch.zeros((len(chunk), 3, *canvas), dtype=torch.float32)
            for b, i in enumerate(chunk):
                h, w = crops[i].resized
                batch[b, :, :h, :w] = _crop_pixels(array, crops[i])
            boxes = torch.from_numpy(np.stack([crops[i].input_box for i in chunk]))[:, None]
            box_labels = torch.from_numpy(
                np.array([[labels[crops[i].box]] for i in chunk], dtype=np.int64))
            out = backend.segment_boxes(batch, [crops[i].resized for i in chunk], boxes,
                                        box_labels)
            for b, i in enumerate(chunk):
                results[i] = CropResult(out.mask_probs[b, 0].float().cpu(),
                                        float(out.scores[b, 0]), int(out.labels[b, 0]))
    return results  # type: ignore[return-value]


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


def mask_confidence(probs: Tensor, input_box: np.ndarray) -> float:
    """How decided the mask is inside its box, in [0, 1]: the mean of ``|2p - 1|`` over the
    box's stride-4 cells (1: every cell certainly in or out; 0: every cell at 0.5)."""
    cells = box_cells(probs, input_box).float()
    return float((2 * cells - 1).abs().mean())


def quality_score(result: CropResult, crop: Crop) -> float:
    """The score of a candidate mask, in [0, 1]: the model's box score times the mask's
    :func:`mask_confidence` (a collapsed or undecided mask scores low)."""
    return float(result.score) * mask_confidence(result.probs, crop.input_box)


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


def final_mask(result: CropResult, crop: Crop, box: np.ndarray, image_size: tuple[int, int],
               cfg: Any, fallback: bool) -> tuple[InstanceMasks, bool]:
    """A candidate's mask in the original image (:func:`paste_crop`, clipped to ``box`` when
    ``cfg.clip_to_box``) and whether it fell back: with ``fallback``, an empty or near-empty
    mask is thresholded again at ``FALLBACK_RATIO`` of its highest probability in the box."""
    clip = box if cfg.clip_to_box else None
    mask = paste_crop(result, crop, clip, image_size, cfg.mask_threshold)
    if not (fallback and is_empty(int(mask.areas()[0]), box)):
        return mask, False
    peak = float(box_cells(result.probs, crop.input_box).max())
    threshold = min(cfg.mask_threshold, FALLBACK_RATIO * peak)
    return paste_crop(result, crop, clip, image_size, threshold), True


def segment_per_box(backend: Any, array: np.ndarray, boxes: np.ndarray, labels: np.ndarray,
                    cfg: Any, train_size: float | None,
                    options: BoxScaleOptions = BoxScaleOptions(),
                    trace: list[dict[str, Any]] | None = None) -> BoxMasks:
    """One mask per prompt box, each from the best of its :func:`candidate_scales`.

    Args:
        backend: any :class:`serving.backends.Backend`.
        array: (H, W, 3) uint8 RGB image.
        boxes: (M, 4) float32 XYXY original pixels; labels: (M,) int64 (-1: predict).
        cfg: the ``InferenceConfig`` (``min_size``, ``max_size``, ``mask_threshold``,
            ``clip_to_box``).
        train_size: :func:`trained_size` of the model.
        trace: diagnostics (benchmarks): when a list, every candidate is appended as a dict
            (``box``, ``scale``, ``score``, ``quality``, ``mask``: its InstanceMasks).

    Returns:
        :class:`BoxMasks`; a mask that fell back (the model's own mask was empty) scores
        exactly 0, which ``sim label`` flags ``sim_empty``.

    Boxes are handled ``BOX_CHUNK`` at a time: only their crops' probabilities are held.
    """
    height, width = array.shape[:2]
    model_scale = resized_shape(height, width, cfg.min_size, cfg.max_size)[0] / height
    scales = candidate_scales(boxes, model_scale, train_size, cfg.max_size, options)
    parts, scores = [], np.zeros(len(boxes), np.float32)
    out_labels = np.zeros(len(boxes), np.int64)
    for start in range(0, len(boxes), BOX_CHUNK):
        crops = [plan_crop(i, boxes[i], r, (height, width), cfg.max_size, options.context)
                 for i in range(start, min(start + BOX_CHUNK, len(boxes))) for r in scales[i]]
        results = run_crops(backend, array, crops, labels)
        best: dict[int, tuple[float, float, Crop, CropResult]] = {}
        for crop, result in zip(crops, results, strict=True):
            quality = quality_score(result, crop)
            rank = quality if options.select == "quality" else result.score
            if crop.box not in best or rank > best[crop.box][0]:
                best[crop.box] = (rank, quality, crop, result)
            if trace is not None:
                trace.append({"box": crop.box, "scale": crop.scale, "score": result.score,
                              "quality": quality,
                              "mask": final_mask(result, crop, boxes[crop.box],
                                                 (height, width), cfg, options.fallback)[0]})
        for i in sorted(best):
            _, quality, crop, result = best[i]
            mask, fell_back = final_mask(result, crop, boxes[i], (height, width), cfg,
                                         options.fallback)
            parts.append(mask)
            scores[i], out_labels[i] = 0.0 if fell_back else quality, result.label
    return BoxMasks(InstanceMasks.concatenate(parts), scores, out_labels)
