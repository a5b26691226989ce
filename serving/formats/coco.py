"""Reading COCO detection JSON given by users: structure checks and boxes as checked XYXY.

Used by ``predict --boxes`` and ``label``; every problem is a one-line
:class:`serving.errors.DatasetError` / :class:`serving.errors.BoxError` naming the entry.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BoxError, DatasetError, ImageError
from ..inference.boxes import validate_boxes


def read_coco_json(path: str | os.PathLike, what: str = "annotations") -> dict[str, Any]:
    """Read a COCO detection JSON and check its structure (not its boxes).

    Needs ``images`` (each with ``id`` and ``file_name``), and optionally ``annotations``
    (each with ``id`` and ``image_id``) and ``categories`` (each with ``id`` and ``name``).
    Raises :class:`DatasetError` with a one-line message naming the problem.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{what} {p}: file not found; check the path") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{what} {p}: not valid JSON ({exc}); fix or re-export it") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{what} {p}: not a COCO JSON (needs an 'images' list)")
    data.setdefault("annotations", [])
    data.setdefault("categories", [])
    for key, fields in (("images", ("id", "file_name")), ("annotations", ("id", "image_id")),
                        ("categories", ("id", "name"))):
        if not isinstance(data[key], list):
            raise DatasetError(f"{what} {p}: '{key}' must be a list")
        for i, entry in enumerate(data[key]):
            missing = [f for f in fields if not isinstance(entry, dict) or f not in entry]
            if missing:
                raise DatasetError(
                    f"{what} {p}: {key}[{i}] lacks '{missing[0]}'; every entry needs "
                    f"{' and '.join(fields)}"
                )
    ids = [img["id"] for img in data["images"]]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise DatasetError(f"{what} {p}: image ids must be integers (COCO convention)")
    ann_ids = [ann["id"] for ann in data["annotations"]]
    if len(set(ann_ids)) != len(ann_ids):
        raise DatasetError(f"{what} {p}: duplicate annotation ids; give each a unique id")
    if len(set(ids)) != len(ids):
        raise DatasetError(f"{what} {p}: duplicate image ids; give each image a unique id")
    return data



def coco_box(ann: dict[str, Any], image_size: tuple[int, int]) -> np.ndarray:
    """The annotation's COCO ``bbox`` [x, y, w, h] as a checked, clipped XYXY box.

    Returns (4,) float32 XYXY in original pixels. Raises :class:`BoxError` naming the
    annotation id for a missing/non-numeric bbox, NaN, reversed or zero-area, or outside.
    """
    bbox = ann.get("bbox")
    try:
        x, y, w, h = (float(v) for v in bbox)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise BoxError(
            f"annotation {ann.get('id')}: bbox {bbox!r} is not [x, y, width, height]"
        ) from None
    where = f"annotation {ann.get('id')}: bbox [{x:g}, {y:g}, {w:g}, {h:g}]"
    if not np.isfinite([x, y, w, h]).all():
        raise BoxError(f"{where} contains NaN or inf; give finite pixel values")
    if w <= 0 or h <= 0:
        raise BoxError(f"{where} has zero or negative width/height (reversed or empty box); "
                       "COCO boxes are [x, y, width, height] with width and height > 0")
    try:
        return validate_boxes([[x, y, x + w, y + h]], image_size, 1)[0]
    except BoxError as exc:  # outside the image (the checks above catch everything else)
        reason = str(exc).removeprefix("box 0: ")
        raise BoxError(f"{where} {reason}") from None



def check_image_size(entry: dict[str, Any], image: np.ndarray, name: str) -> None:
    """Raise :class:`ImageError` when a COCO image entry's ``height``/``width`` disagree with
    the decoded (EXIF-rotated) image, whose frame the boxes must be in."""
    h, w = entry.get("height"), entry.get("width")
    if h is not None and w is not None and tuple(image.shape[:2]) != (h, w):
        raise ImageError(
            f"image {name}: decoded size {image.shape[1]}x{image.shape[0]} differs from the "
            f"JSON's {w}x{h}; fix the JSON's width/height (EXIF rotation is applied when "
            "decoding)")
