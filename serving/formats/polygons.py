"""Binary masks to COCO polygons (for ``label --format polygon``).

Polygons are traced with scikit-image's marching squares (``skimage.measure.find_contours``
at level 0.5) and simplified with Douglas-Peucker (``approximate_polygon``, 0.5 px). Only outer
boundaries are kept: COCO polygons are filled and unioned, so they cannot express holes (a
ring becomes a disc). Use RLE, the default, where holes matter. scikit-image is imported
lazily; without it :func:`require_polygon_support` raises a one-line error.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import InputError

#: Douglas-Peucker tolerance in pixels.
SIMPLIFY_TOLERANCE = 0.5


def require_polygon_support() -> None:
    """Raise :class:`InputError` when scikit-image (the contour tracer) is missing."""
    try:
        import skimage.measure  # noqa: F401
    except ImportError:
        raise InputError(
            "--format polygon needs scikit-image; pip install scikit-image, or use --format rle"
        ) from None


def mask_to_polygons(mask: np.ndarray, tolerance: float = SIMPLIFY_TOLERANCE,
                     ) -> list[list[float]]:
    """Outer boundaries of a binary mask as COCO polygons.

    Args:
        mask: (H, W) bool (or 0/1) mask.
        tolerance: simplification tolerance in pixels (0 keeps every contour vertex).

    Returns:
        A list of polygons ``[x1, y1, x2, y2, ...]`` in COCO's continuous pixel frame (pixel
        ``(r, c)`` covers ``[c, c+1) x [r, r+1)``), one per connected part, each with at least
        3 vertices. Empty when the mask is empty. Rasterising them with pycocotools gives the
        mask back up to the simplification and without holes.
    """
    from skimage.measure import approximate_polygon, find_contours

    padded = np.pad(np.asarray(mask, dtype=np.float32), 1)
    polygons = []
    # 'high': outer boundaries wind one way and hole boundaries the other (sign of the area).
    for contour in find_contours(padded, 0.5, positive_orientation="high"):
        if tolerance > 0:
            contour = approximate_polygon(contour, tolerance=tolerance)
        # (row, col) of the padded array -> (x, y): -1 undoes the pad, +0.5 moves from pixel
        # centres (integer indices) to COCO's frame where pixel centres sit at k + 0.5.
        x = contour[:, 1] - 0.5
        y = contour[:, 0] - 0.5
        if len(x) > 1 and x[0] == x[-1] and y[0] == y[-1]:
            x, y = x[:-1], y[:-1]  # COCO polygons are implicitly closed
        if len(x) < 3:
            continue
        signed_area = 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))
        if signed_area >= 0:  # a hole (or a degenerate sliver)
            continue
        polygons.append(np.stack([x, y], axis=1).round(2).ravel().tolist())
    return polygons


def largest_polygon(polygons: list[list[float]]) -> list[float]:
    """The polygon ``[x1, y1, x2, y2, ...]`` of largest area (shoelace) among ``polygons``;
    formats that hold one polygon per object (YOLO segmentation, Label Studio polygons) keep
    this part of a mask."""
    def area(p: list[float]) -> float:
        xs, ys = np.asarray(p[0::2], np.float64), np.asarray(p[1::2], np.float64)
        return abs(float(np.sum(xs * np.roll(ys, 1) - np.roll(xs, 1) * ys))) / 2

    return max(polygons, key=area)


def scaled_up(values: list[float], scale: float, decimals: int) -> list[float]:
    """``values * scale`` (pixels to a normalised or percent frame) rounded *up* at
    ``decimals``. Polygon vertices from :func:`mask_to_polygons` sit on pixel edges, where
    pycocotools' rasteriser rounds half up; rounding them up keeps each vertex on the side of
    the edge it came from, so the written polygon rasterises to the same pixels (rounding
    to nearest moves half of them a pixel column inwards). The error is below
    ``10**-decimals`` of the frame."""
    factor = 10 ** decimals
    return [math.ceil(v * scale * factor - 1e-6) / factor for v in values]
