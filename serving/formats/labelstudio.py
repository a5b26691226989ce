"""Label Studio: JSON exports in (rectangles), tasks with predictions out (brush or polygons).

In: a Label Studio JSON export, a list of tasks ``{"id", "data": {"image": ...},
"annotations": [{"result": [...]}], "predictions": [...]}``. Each task's boxes are the
``rectanglelabels`` results of its latest annotation that was not cancelled (or, without one,
of its latest prediction): ``value.x``, ``y``, ``width``, ``height`` in percent of
``original_width``/``original_height``, the label ``value.rectanglelabels[0]``. The image is
the file of the same name as ``data.image`` (an upload's ``/data/upload/<project>/<8 hex>-``
prefix is dropped where no file has the full name) in the image folder.

Out: the same tasks (``data`` and the boxes' annotations kept, task ids dropped, so the file
imports into any project) with one prediction each, ``{"model_version", "score", "result"}``,
one result per labelled box: ``brushlabels`` in Label Studio's brush RLE, or
``polygonlabels`` (the mask's largest outer polygon) in percent coordinates, with the box's
label and its ``score``. The names of the results (``from_name``/``to_name``) come from the
project's labelling config when given (:func:`result_names`), else ``mask``/``polygon`` and
the rectangles' ``to_name``.

The brush RLE is encoded by ``label-studio-converter`` (``brush.mask2rle``, HumanSignal's own
encoder, extra ``labelstudio``); its ``brush`` module is loaded on its own because the
package's ``__init__`` imports its whole converter (NLTK and more, ~5 s).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np

from ..errors import DatasetError, InputError
from ..files import write_json
from ..inference.images import IMAGE_EXTENSIONS
from .boxsets import BoxSet, read_json_file, upright_size
from .polygons import largest_polygon, scaled_up

#: Default result names when no labelling config is given.
DEFAULT_NAMES = {"brush": "mask", "polygon": "polygon", "to_name": "image"}
#: Decimals of polygon points in percent (rounded up: :func:`scaled_up`).
PERCENT_DECIMALS = 6
_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")
_TAGS = {"brush": "BrushLabels", "polygon": "PolygonLabels", "rectangle": "RectangleLabels"}


@functools.lru_cache(maxsize=1)
def brush_module() -> ModuleType:
    """``label_studio_converter.brush``, loaded without its package (see the module
    docstring); :class:`InputError` naming the extra when it is not installed."""
    spec = importlib.util.find_spec("label_studio_converter")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("Label Studio brush masks need label-studio-converter; pip install "
                         "'sim-boxseg[labelstudio]', or write polygons (labelstudio-polygon)")
    path = Path(list(spec.submodule_search_locations)[0]) / "brush.py"
    name = "_sim_label_studio_brush"
    loader = importlib.util.spec_from_file_location(name, path)
    assert loader is not None and loader.loader is not None
    module = importlib.util.module_from_spec(loader)
    sys.modules[name] = module
    loader.loader.exec_module(module)
    return module


def result_names(label_config: str | None, kind: str) -> tuple[str, str | None]:
    """(from_name, to_name) of the first ``BrushLabels`` (kind ``brush``), ``PolygonLabels``
    (``polygon``) or ``RectangleLabels`` (``rectangle``) tag of a labelling config;
    defaults when there is none. ``to_name`` ``None``: use the rectangle's own."""
    if label_config:
        try:
            root = ET.fromstring(label_config)
        except ET.ParseError as exc:
            raise InputError(f"label config: not valid XML ({exc}); pass the project's "
                             "labelling config") from None
        for tag in root.iter(_TAGS[kind]):
            if tag.get("name"):
                return str(tag.get("name")), tag.get("toName")
    return DEFAULT_NAMES.get(kind, "label"), None


def read_label_config(path: str | os.PathLike | None) -> str | None:
    """The text of a labelling config file (``--label-config``), or ``None`` for none."""
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--label-config {path}: cannot be read "
                         f"({getattr(exc, 'strerror', None) or exc}); pass the project's "
                         "labelling config (Settings > Labeling Interface > Code)") from None


# ----------------------------------------------------------------------------- reading
def image_ref(data: dict[str, Any]) -> str | None:
    """The image a task's ``data`` points to: ``data["image"]``, else its first value that
    looks like an image (a URL, a Label Studio path, a data URI, a file with an image
    extension)."""
    value = data.get("image")
    if isinstance(value, str) and value.strip():
        return value
    for value in data.values():
        if isinstance(value, str) and (
                value.startswith(("/data/", "http://", "https://", "data:image/", "s3://",
                                  "gs://")) or value.lower().endswith(IMAGE_EXTENSIONS)):
            return value
    return None


def local_name(ref: str, images: Path) -> str:
    """The file under ``images`` for an image reference (see the module docstring)."""
    parts = urlsplit(ref)
    path = parse_qs(parts.query).get("d", [parts.path])[0] if "local-files" in ref else \
        parts.path
    name = unquote(Path(path).name)
    if not (images / name).is_file() and _UPLOAD_PREFIX.match(name):
        stripped = _UPLOAD_PREFIX.sub("", name)
        if (images / stripped).is_file():
            return stripped
    return name


def box_results(task: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``rectanglelabels`` results of the task's latest kept annotation (else latest
    prediction)."""
    for key in ("annotations", "predictions"):
        items = [a for a in task.get(key) or [] if isinstance(a, dict)
                 and not a.get("was_cancelled") and isinstance(a.get("result"), list)]
        rects = [r for r in (items[-1]["result"] if items else [])
                 if isinstance(r, dict) and r.get("type") == "rectanglelabels"]
        if rects:
            return rects
    return []


def rectangle_box(result: dict[str, Any], size: tuple[int, int]) -> list[float]:
    """COCO [x, y, w, h] pixels of a rectangle result on an image of ``size`` (W, H);
    :class:`InputError` (the reason) for a rotated, zero-size or non-numeric one."""
    value = result.get("value") or {}
    try:
        x, y, w, h = (float(value[k]) for k in ("x", "y", "width", "height"))
    except (KeyError, TypeError, ValueError):
        raise InputError("value lacks numeric x, y, width, height") from None
    if not np.isfinite([x, y, w, h]).all():
        raise InputError("x, y, width or height is NaN or inf")
    if w <= 0 or h <= 0:
        raise InputError(f"zero width or height ({w:g}% x {h:g}%); delete the rectangle")
    if float(value.get("rotation") or 0.0) % 360 != 0:
        raise InputError(f"rotated by {value.get('rotation')} degrees; only upright boxes "
                         "prompt the model")
    width, height = size
    return [x / 100 * width, y / 100 * height, w / 100 * width, h / 100 * height]


def rectangle_label(result: dict[str, Any]) -> str:
    labels = (result.get("value") or {}).get("rectanglelabels") or []
    return str(labels[0]) if labels else "object"


def _task_size(rects: list[dict[str, Any]], file: Path) -> tuple[int, int] | None:
    for r in rects:
        w, h = r.get("original_width"), r.get("original_height")
        if isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0:
            return w, h
    return upright_size(file)


def read_labelstudio(path: str | os.PathLike, images: str | os.PathLike) -> BoxSet:
    """Read a Label Studio JSON export (see the module docstring) into a :class:`BoxSet`.
    A task without an image, or a rectangle that cannot prompt, is skipped and named in
    ``BoxSet.skipped`` (``<file> task <id>`` [``result <id>``]); the rest is read."""
    p, image_dir = Path(path), Path(images)
    tasks = read_json_file(p, "annotations")
    if not isinstance(tasks, list):
        raise DatasetError(f"annotations {p}: not a Label Studio export (a list of tasks)")
    if not image_dir.is_dir():
        raise InputError(f"images {image_dir}: not a folder; pass the folder of the tasks' "
                         "images")
    out = BoxSet({"images": [], "annotations": [], "categories": []}, "labelstudio", p,
                 extra={"tasks": tasks, "task_of_image": {}, "results": {}})
    labels: dict[str, int] = {}
    for index, task in enumerate(tasks):
        tid = task.get("id", f"#{index}") if isinstance(task, dict) else f"#{index}"
        where = f"{p} task {tid}"
        ref = image_ref(task["data"]) if isinstance(task, dict) and isinstance(
            task.get("data"), dict) else None
        if ref is None:
            out.skipped.append((where, "no image in its data (expected data.image)"))
            continue
        name = local_name(ref, image_dir)
        rects = box_results(task)
        size = _task_size(rects, image_dir / name)
        image_id = len(out.dataset["images"]) + 1
        entry: dict[str, Any] = {"id": image_id, "file_name": name}
        if size is not None:
            entry.update(width=size[0], height=size[1])
        out.dataset["images"].append(entry)
        out.extra["task_of_image"][image_id] = index
        for result in rects:
            _add_rectangle(out, labels, image_id, result, size, f"{where} result "
                           f"{result.get('id')}")
    out.dataset["categories"] = [{"id": i, "name": n} for n, i in labels.items()]
    return out


def _add_rectangle(out: BoxSet, labels: dict[str, int], image_id: int, result: dict[str, Any],
                   size: tuple[int, int] | None, where: str) -> None:
    if size is None:
        out.skipped.append((where, "no original_width/height and the image cannot be read"))
        return
    try:
        box = rectangle_box(result, size)
    except InputError as exc:
        out.skipped.append((where, str(exc)))
        return
    label = rectangle_label(result)
    category = labels.setdefault(label, len(labels) + 1)
    ann_id = len(out.dataset["annotations"]) + 1
    out.dataset["annotations"].append({"id": ann_id, "image_id": image_id,
                                       "category_id": category, "bbox": box,
                                       "area": box[2] * box[3], "iscrowd": 0})
    out.extra["results"][ann_id] = {"id": result.get("id"), "to_name": result.get("to_name")}


# ----------------------------------------------------------------------------- writing
def brush_result(mask: np.ndarray, label: str, score: float, from_name: str, to_name: str,
                 result_id: str) -> dict[str, Any]:
    """A ``brushlabels`` result of an (H, W) bool mask in Label Studio's brush RLE."""
    rle = brush_module().mask2rle(np.asarray(mask, dtype=np.uint8) * 255)
    h, w = mask.shape
    return {"id": result_id, "from_name": from_name, "to_name": to_name, "type": "brushlabels",
            "original_width": int(w), "original_height": int(h), "image_rotation": 0,
            "value": {"format": "rle", "rle": [int(v) for v in rle], "brushlabels": [label]},
            "score": round(float(score), 5)}


def polygon_result(polygons: list[list[float]], size: tuple[int, int], label: str,
                   score: float, from_name: str, to_name: str,
                   result_id: str) -> dict[str, Any] | None:
    """A ``polygonlabels`` result of the largest of COCO ``polygons`` (pixels) on an image
    of ``size`` (W, H), in percent; ``None`` when there is no polygon."""
    if not polygons:
        return None
    poly = largest_polygon(polygons)
    w, h = size
    points = [list(p) for p in zip(scaled_up(poly[0::2], 100 / w, PERCENT_DECIMALS),
                                   scaled_up(poly[1::2], 100 / h, PERCENT_DECIMALS))]
    return {"id": result_id, "from_name": from_name, "to_name": to_name,
            "type": "polygonlabels", "original_width": int(w), "original_height": int(h),
            "image_rotation": 0,
            "value": {"points": points, "closed": True, "polygonlabels": [label]},
            "score": round(float(score), 5)}


def ls_rle_to_mask(rle: list[int], height: int, width: int) -> np.ndarray:
    """(H, W) bool mask of a Label Studio brush RLE (the converter's ``decode_rle``)."""
    flat = brush_module().decode_rle(rle)
    return flat.reshape(height, width, 4)[:, :, 3] > 127


def _result_of(ann: dict[str, Any], img: dict[str, Any], label: str, kind: str,
               names: tuple[str, str], result_id: str) -> dict[str, Any] | None:
    segm, size = ann["segmentation"], (img["width"], img["height"])
    if kind == "polygon":
        if not isinstance(segm, list):
            return None
        return polygon_result(segm, size, label, ann.get("score", 0.0), *names, result_id)
    from pycocotools import mask as mask_util

    rle = segm if isinstance(segm, dict) else mask_util.merge(
        mask_util.frPyObjects(segm, img["height"], img["width"]))
    rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")
           if isinstance(rle["counts"], str) else rle["counts"]}
    mask = mask_util.decode(rle).astype(bool)
    return brush_result(mask, label, ann.get("score", 0.0), *names, result_id)


def write_predictions(out: Path, labelled: dict[str, Any], boxes: BoxSet, kind: str,
                      label_config: str | None = None, model_version: str = "sim") -> list[str]:
    """Write ``labelled`` as Label Studio tasks with one prediction each (see the module
    docstring); ``kind`` ``brush`` or ``polygon``. Returns notes for the user."""
    from_name, config_to = result_names(label_config, kind)
    names = {c["id"]: str(c["name"]) for c in labelled["categories"]}
    per_image: dict[Any, list[dict[str, Any]]] = {img["id"]: [] for img in labelled["images"]}
    for ann in labelled["annotations"]:
        if ann.get("segmentation") and ann.get("image_id") in per_image:
            per_image[ann["image_id"]].append(ann)
    tasks = boxes.extra.get("tasks") if boxes.source == "labelstudio" else None
    meta = boxes.extra.get("results", {}) if tasks is not None else {}
    written, missing = [], 0
    for img in labelled["images"]:
        task = tasks[boxes.extra["task_of_image"][img["id"]]] if tasks is not None else \
            {"data": {"image": img["file_name"]}}
        results = []
        for ann in per_image[img["id"]]:
            info = meta.get(ann["id"], {})
            to_name = config_to or info.get("to_name") or DEFAULT_NAMES["to_name"]
            result = _result_of(ann, img, names.get(ann.get("category_id"), "object"), kind,
                                (from_name, to_name), f"sim{ann['id']}")
            missing += result is None
            if result is not None:
                results.append(result)
        scores = [r["score"] for r in results]
        entry: dict[str, Any] = {"data": task["data"], "predictions": [{
            "model_version": model_version, "result": results,
            "score": round(float(np.mean(scores)), 5) if scores else 0.0}]}
        kept = [{"result": a["result"]} for a in task.get("annotations") or []
                if isinstance(a, dict) and not a.get("was_cancelled") and a.get("result")]
        if kept:
            entry["annotations"] = kept
        written.append(entry)
    write_json(out, written)
    return [f"{missing} masks had no polygon (empty or too thin) and have no result"] \
        if missing else []
