"""Checking prompt boxes given by users (the bad-input contract of DESIGN.md section 7)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import BoxError

BoxesLike = Any  # (M, 4) array-like of XYXY pixels
#: Most pixels the masks of one image's prompt boxes may cover together (box areas summed):
#: a byte each, so about 1 GiB of masks. ``Segmenter.max_mask_pixels`` may change it.
MAX_MASK_PIXELS = 1 << 30


def validate_boxes(boxes: BoxesLike, image_size: tuple[int, int], max_boxes: int) -> np.ndarray:
    """Check prompt boxes and clip them to the image.

    Args:
        boxes: (M, 4) XYXY in original pixels.
        image_size: (height, width) of the image.

    Returns:
        (M, 4) float32 boxes clipped to the image.

    Raises:
        BoxError: wrong shape, NaN/inf, reversed or zero-area, outside the image, too many.
    """
    try:
        arr = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError):
        raise BoxError("boxes: not numeric; pass an (M, 4) list of [x1, y1, x2, y2]") from None
    if arr.size == 0:
        return np.zeros((0, 4), dtype=np.float32)
    if arr.ndim == 1 and arr.shape[0] == 4:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise BoxError(f"boxes: expected shape (M, 4) of [x1, y1, x2, y2], got {arr.shape}")
    if arr.shape[0] > max_boxes:
        raise BoxError(f"boxes: {arr.shape[0]} given, the limit is {max_boxes}; split the request")
    for i, (x1, y1, x2, y2) in enumerate(arr):
        if not np.isfinite([x1, y1, x2, y2]).all():
            raise BoxError(f"box {i}: contains NaN or inf; give finite pixel coordinates")
        if x2 <= x1 or y2 <= y1:
            raise BoxError(
                f"box {i}: [{x1:g}, {y1:g}, {x2:g}, {y2:g}] is reversed or has zero area; "
                "use [x1, y1, x2, y2] with x2 > x1 and y2 > y1"
            )
    h, w = image_size
    clipped = arr.copy()
    clipped[:, [0, 2]] = arr[:, [0, 2]].clip(0, w)
    clipped[:, [1, 3]] = arr[:, [1, 3]].clip(0, h)
    for i, (x1, y1, x2, y2) in enumerate(clipped):
        if x2 - x1 < 1 or y2 - y1 < 1:
            bx1, by1, bx2, by2 = arr[i]
            if bx2 - bx1 < 1 or by2 - by1 < 1:
                raise BoxError(f"box {i}: [{bx1:g}, {by1:g}, {bx2:g}, {by2:g}] is "
                               f"{bx2 - bx1:g} x {by2 - by1:g} pixels, under one pixel across; "
                               "give boxes at least 1 pixel wide and tall")
            raise BoxError(f"box {i}: lies outside the {w}x{h} image; give boxes on the image")
    return clipped.astype(np.float32)


def mask_pixels(boxes: np.ndarray | None, image_size: tuple[int, int],
                clip_to_box: bool = True) -> int:
    """The pixels a request's masks may cover: the cost the server admits and batches by.

    Prompted masks clipped to their boxes cover at most the boxes' areas (in whole pixels,
    summed over boxes); unclipped ones, the image per box. Automatic mode counts the image
    once (its masks are kept as crops of their own extent).

    Args:
        boxes: (M, 4) XYXY original pixels, clipped to the image, or ``None`` (automatic).
        image_size: (H, W) of the original image.
    """
    h, w = image_size
    if boxes is None:
        return h * w
    if not clip_to_box:
        return h * w * len(boxes)
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    widths = np.clip(np.ceil(b[:, 2]) - np.floor(b[:, 0]), 0, w)
    heights = np.clip(np.ceil(b[:, 3]) - np.floor(b[:, 1]), 0, h)
    return int(np.sum(widths * heights))


def check_mask_pixels(boxes: np.ndarray, image_size: tuple[int, int], clip_to_box: bool,
                      limit: int = MAX_MASK_PIXELS) -> int:
    """:func:`mask_pixels` of checked ``boxes``, or :class:`BoxError` above ``limit``."""
    cost = mask_pixels(boxes, image_size, clip_to_box)
    if cost > limit:
        h, w = image_size
        raise BoxError(f"boxes: the {len(boxes)} boxes cover {cost} pixels of the {w}x{h} "
                       f"image in total (box areas summed), over the limit of {limit} mask "
                       "pixels per image (Segmenter.max_mask_pixels); split the boxes over "
                       "several calls")
    return cost
