"""YOLO datasets: detection ``.txt`` folders in, segmentation ``.txt`` folders out.

In: a labels folder (or a dataset folder holding ``labels/``) of one ``.txt`` per image, each
line ``class cx cy w h`` normalised to [0, 1] by the image's width and height (the
EXIF-rotated image, as Ultralytics reads it), class names from ``classes.txt`` (one per line)
or ``data.yaml``/``dataset.yaml`` (``names`` as a list or an index map) in the labels folder
or up to two folders above it. Images are matched by their path below ``--images`` with the
extension replaced by ``.txt``; an image without a ``.txt`` has no boxes.

Out: a YOLO segmentation dataset folder: ``labels/<image path>.txt`` with one line per mask,
``class x1 y1 x2 y2 ...`` (the mask's largest outer polygon, normalised, rounded up at 6
decimals: :func:`serving.formats.polygons.scaled_up`), the same
class indices as the input, ``classes.txt``, ``data.yaml`` and an ``images`` link to the image
folder, so the folder trains as it is.

The text format is parsed here rather than through a converter library (``supervision`` or
``datumaro``) because the reader must name the file and line of every bad line and go on,
and those libraries bring OpenCV and more for a five-field text line.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import yaml

from ..errors import InputError
from ..inference.images import IMAGE_EXTENSIONS
from .boxsets import BoxSet, read_text_lines, upright_size
from .polygons import largest_polygon, scaled_up

#: Files that may name the classes, looked for in the labels folder and two folders above.
NAME_FILES = ("classes.txt", "data.yaml", "dataset.yaml")
#: Decimals of the normalised coordinates written (1e-6 of the side: sub-pixel below 10^5 px).
DECIMALS = 6


def _names_from(path: Path) -> list[str]:
    if path.suffix == ".txt":
        return [line.strip() for line in read_text_lines(path, "classes") if line.strip()]
    try:
        data = yaml.safe_load("\n".join(read_text_lines(path, "data.yaml")))
    except yaml.YAMLError as exc:
        raise InputError(f"classes {path}: not valid YAML ({str(exc).splitlines()[0]}); fix "
                         "it") from None
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, dict) and all(isinstance(k, int) for k in names):
        return [str(names[k]) for k in sorted(names)] if sorted(names) == list(
            range(len(names))) else []
    if isinstance(names, list):
        return [str(n) for n in names]
    raise InputError(f"classes {path}: no 'names' list or index map; add names: [a, b, ...]")


def class_names(labels_dir: Path) -> tuple[list[str], Path]:
    """The class names and the file they came from (see the module docstring)."""
    for folder in (labels_dir, labels_dir.parent, labels_dir.parent.parent):
        for name in NAME_FILES:
            if (folder / name).is_file():
                names = _names_from(folder / name)
                if names:
                    return names, folder / name
    raise InputError(f"annotations {labels_dir}: no classes.txt or data.yaml with 'names' in it "
                     "or the two folders above; write classes.txt, one class name per line")


def _labels_folder(path: Path) -> Path:
    return path / "labels" if (path / "labels").is_dir() else path


def _parse_line(line: str, n_classes: int) -> tuple[int, list[float]]:
    """(class index, [cx, cy, w, h]) of one line; :class:`InputError` (reason only) if bad."""
    fields = line.split()
    if len(fields) != 5:
        kind = " (a segmentation line?)" if len(fields) > 6 else ""
        raise InputError(f"{len(fields)} fields{kind}; a YOLO box line is 'class cx cy w h' "
                         "(5 fields)")
    try:
        cls = int(fields[0])
    except ValueError:
        raise InputError(f"class {fields[0]!r} is not an integer index") from None
    if not 0 <= cls < n_classes:
        raise InputError(f"class index {cls} is outside the {n_classes} class names "
                         f"(0-{n_classes - 1}); fix the line or the names file")
    try:
        values = [float(v) for v in fields[1:]]
    except ValueError:
        raise InputError(f"coordinates {' '.join(fields[1:])!r} are not numbers") from None
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values):
        raise InputError(f"coordinates {' '.join(fields[1:])} are outside 0-1; YOLO boxes are "
                         "normalised by the image's width and height")
    if values[2] <= 0 or values[3] <= 0:
        raise InputError(f"zero width or height ({fields[3]} x {fields[4]}); remove the line")
    return cls, values


def _box(values: list[float], size: tuple[int, int]) -> list[float]:
    """COCO [x, y, w, h] in pixels of a normalised (cx, cy, w, h), clipped to the image."""
    cx, cy, w, h = values
    width, height = size
    x1, y1 = max(cx - w / 2, 0.0) * width, max(cy - h / 2, 0.0) * height
    x2, y2 = min(cx + w / 2, 1.0) * width, min(cy + h / 2, 1.0) * height
    return [x1, y1, x2 - x1, y2 - y1]


def _images(images: Path) -> list[Path]:
    if not images.is_dir():
        raise InputError(f"images {images}: not a folder; pass the dataset's image folder")
    return sorted(p for p in images.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def read_yolo(path: str | os.PathLike, images: str | os.PathLike) -> BoxSet:
    """Read a YOLO detection dataset (see the module docstring) into a :class:`BoxSet`.

    Bad lines are skipped (``BoxSet.skipped``: ``("<file> line <n>", reason)``) and the rest
    is read; a ``.txt`` with no image is skipped whole.
    """
    labels_dir, image_dir = _labels_folder(Path(path)), Path(images)
    names, _ = class_names(labels_dir)
    out = BoxSet({"images": [], "annotations": [],
                  "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)]},
                 "yolo", labels_dir, extra={"names": names})
    used: set[Path] = set()
    for image_id, image in enumerate(_images(image_dir), start=1):
        rel = image.relative_to(image_dir)
        size = upright_size(image)
        entry: dict[str, Any] = {"id": image_id, "file_name": rel.as_posix()}
        if size is not None:
            entry.update(width=size[0], height=size[1])
        out.dataset["images"].append(entry)
        txt = labels_dir / rel.with_suffix(".txt")
        if not txt.is_file():
            continue
        used.add(txt.resolve())
        _read_file(txt, image_id, size, len(names), out)
    for txt in sorted(labels_dir.rglob("*.txt")):
        if txt.name not in NAME_FILES and txt.resolve() not in used:
            out.skipped.append((str(txt), f"no image of that name under {image_dir}"))
    return out


def _read_file(txt: Path, image_id: int, size: tuple[int, int] | None, n_classes: int,
               out: BoxSet) -> None:
    lines = read_text_lines(txt, "labels")
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{txt} line {n}"
        try:
            cls, values = _parse_line(line, n_classes)
        except InputError as exc:
            out.skipped.append((where, str(exc)))
            continue
        if size is None:
            out.skipped.append((where, "its image cannot be read"))
            continue
        box = _box(values, size)
        ann_id = len(out.dataset["annotations"]) + 1
        out.dataset["annotations"].append({
            "id": ann_id, "image_id": image_id, "category_id": cls + 1, "bbox": box,
            "area": box[2] * box[3], "iscrowd": 0})


def seg_line(cls: int, polygons: list[list[float]], width: int, height: int) -> str:
    """One YOLO segmentation line: the largest of the COCO ``polygons`` (pixels), normalised."""
    poly = largest_polygon(polygons)
    xs = scaled_up(poly[0::2], 1.0 / width, DECIMALS)
    ys = scaled_up(poly[1::2], 1.0 / height, DECIMALS)
    coords = [min(max(v, 0.0), 1.0) for xy in zip(xs, ys) for v in xy]
    return " ".join([str(cls)] + [f"{v:.{DECIMALS}f}" for v in coords])


def write_yolo_seg(out: Path, labelled: dict[str, Any], boxes: BoxSet, images: Path) -> list[str]:
    """Write ``labelled`` (COCO with polygon segmentations) as a YOLO segmentation dataset
    in folder ``out`` (see the module docstring); returns notes for the user (masks without
    a polygon, which have no line)."""
    index = {c["id"]: i for i, c in enumerate(labelled["categories"])}
    names = [str(c["name"]) for c in labelled["categories"]]
    by_image: dict[Any, list[str]] = {img["id"]: [] for img in labelled["images"]}
    images_by_id = {img["id"]: img for img in labelled["images"]}
    no_polygon = 0
    for ann in labelled["annotations"]:
        segm = ann.get("segmentation")
        if not segm or ann.get("image_id") not in by_image:
            continue
        if not isinstance(segm, list):
            no_polygon += 1
            continue
        img = images_by_id[ann["image_id"]]
        by_image[ann["image_id"]].append(
            seg_line(index.get(ann.get("category_id"), 0), segm, img["width"], img["height"]))
    for img in labelled["images"]:
        txt = out / "labels" / Path(str(img["file_name"])).with_suffix(".txt")
        txt.parent.mkdir(parents=True, exist_ok=True)
        txt.write_text("".join(line + "\n" for line in by_image[img["id"]]), encoding="utf-8")
    (out / "classes.txt").write_text("".join(n + "\n" for n in names), encoding="utf-8")
    (out / "data.yaml").write_text(yaml.safe_dump(
        {"path": str(out.resolve()), "train": "images", "val": "images",
         "names": dict(enumerate(names))}, sort_keys=False), encoding="utf-8")
    link = out / "images"
    if not link.exists() and not link.is_symlink():
        link.symlink_to(Path(images).resolve(), target_is_directory=True)
    return [f"{no_polygon} masks had no polygon (empty or too thin) and have no line"] \
        if no_polygon else []

