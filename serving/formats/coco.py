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

#: Fields every entry of a COCO list must have, and those that must be integers.
_REQUIRED = {"images": ("id", "file_name"), "annotations": ("id", "image_id"),
             "categories": ("id", "name")}
_INTEGER = {"images": ("id", "height", "width"), "annotations": ("id", "image_id",
                                                                  "category_id"),
            "categories": ("id",)}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_entries(data: dict[str, Any], key: str, where: str) -> None:
    """Every entry of ``data[key]`` is an object with the required fields, integer ids."""
    if not isinstance(data[key], list):
        raise DatasetError(f"{where}: '{key}' must be a list")
    for i, entry in enumerate(data[key]):
        missing = [f for f in _REQUIRED[key] if not isinstance(entry, dict) or f not in entry]
        if missing:
            raise DatasetError(f"{where}: {key}[{i}] lacks '{missing[0]}'; every entry needs "
                               f"{' and '.join(_REQUIRED[key])}")
        for name in _INTEGER[key]:
            if name in entry and not _is_int(entry[name]):
                raise DatasetError(f"{where}: {key}[{i}] has {name} {entry[name]!r}; it must be "
                                   "an integer (COCO convention)")
            if key == "images" and name != "id" and name in entry and entry[name] < 1:
                raise DatasetError(f"{where}: images[{i}] has {name} {entry[name]}; it must be "
                                   "the image's size in pixels (at least 1), or left out")


def _check_unique(data: dict[str, Any], where: str) -> None:
    for key, noun in (("images", "image"), ("annotations", "annotation"),
                      ("categories", "category")):
        ids = [entry["id"] for entry in data[key]]
        if len(set(ids)) != len(ids):
            raise DatasetError(f"{where}: duplicate {noun} ids; give each {noun} a unique id")


def read_coco_json(path: str | os.PathLike, what: str = "annotations") -> dict[str, Any]:
    """Read a COCO detection JSON and check its structure (the boxes' values are checked per
    box by :func:`coco_box`, so one bad box does not stop the others).

    Needs ``images`` (each with ``id`` and ``file_name``), and optionally ``annotations``
    (each with ``id`` and ``image_id``) and ``categories`` (each with ``id`` and ``name``);
    ids, ``height``, ``width`` and ``category_id`` are integers and ids unique. Raises
    :class:`DatasetError` with a one-line message naming the entry.
    """
    p = Path(path)
    where = f"{what} {p}"
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{where}: file not found; check the path") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise DatasetError(f"{where}: not valid JSON ({reason}); fix or re-export it") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{where}: not a COCO JSON (needs an 'images' list)")
    data.setdefault("annotations", [])
    data.setdefault("categories", [])
    for key in _REQUIRED:
        _check_entries(data, key, where)
    _check_unique(data, where)
    return data


def unknown_categories(data: dict[str, Any]) -> dict[int, int]:
    """``category_id`` -> number of annotations whose category is not in ``categories``."""
    known = {c["id"] for c in data["categories"]}
    counts: dict[int, int] = {}
    for ann in data["annotations"]:
        cat = ann.get("category_id")
        if cat is not None and cat not in known:
            counts[cat] = counts.get(cat, 0) + 1
    return counts


def coco_box(ann: dict[str, Any], image_size: tuple[int, int]) -> np.ndarray:
    """The annotation's COCO ``bbox`` [x, y, w, h] as a checked, clipped XYXY box.

    Returns (4,) float32 XYXY in original pixels. Raises :class:`BoxError` naming the
    annotation id for a missing/non-numeric bbox, NaN, reversed or zero-area, or outside.
    """
    bbox = ann.get("bbox")
    numbers = isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
    if not numbers:  # a string such as "1234" would otherwise read as four digits
        raise BoxError(f"annotation {ann.get('id')}: bbox {bbox!r} is not [x, y, width, "
                       "height] (4 numbers)")
    x, y, w, h = (float(v) for v in bbox)
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


def boxes_by_image(data: dict[str, Any]) -> list[tuple[np.ndarray, tuple[int, int]]]:
    """Per image with ``height`` and ``width``: its non-crowd, well-formed boxes as (M, 4)
    XYXY original pixels, and its (height, width). For size statistics, not for prompting."""
    sizes = {img["id"]: (img.get("height"), img.get("width")) for img in data["images"]}
    boxes: dict[Any, list[list[float]]] = {}
    for ann in data["annotations"]:
        bbox = ann.get("bbox")
        if ann.get("iscrowd", 0) or not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            continue
        try:
            x, y, w, h = (float(v) for v in bbox)
        except (TypeError, ValueError):
            continue
        if np.isfinite([x, y, w, h]).all() and w > 0 and h > 0:
            boxes.setdefault(ann.get("image_id"), []).append([x, y, x + w, y + h])
    return [(np.asarray(b, np.float64), sizes[i]) for i, b in boxes.items()
            if i in sizes and _is_int(sizes[i][0]) and _is_int(sizes[i][1])]
