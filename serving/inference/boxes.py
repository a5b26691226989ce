"""Checking prompt boxes given by users (the bad-input contract of DESIGN.md section 7)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import BoxError

BoxesLike = Any  # (M, 4) array-like of XYXY pixels


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
