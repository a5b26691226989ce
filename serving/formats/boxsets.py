"""Box datasets in any supported format, read into one COCO-shaped form, and labels written
back out in the format asked for.

``sim label`` and ``sim predict --boxes`` read every box dataset through :func:`read_boxes`,
which picks the reader by the input's shape (or by name):

- ``coco``: a COCO JSON object with an ``images`` list (:mod:`serving.formats.coco`);
- ``yolo``: a folder of YOLO detection ``.txt`` files (:mod:`serving.formats.yolo`);
- ``labelstudio``: a Label Studio JSON export, a list of tasks
  (:mod:`serving.formats.labelstudio`).

Each reader returns a :class:`BoxSet`: a COCO dataset dict (``images`` with ``id``,
``file_name``, ``width``, ``height``; ``annotations`` with ``id``, ``image_id``,
``category_id``, ``bbox`` [x, y, w, h] in pixels; ``categories``) that the existing label and
predict jobs run on unchanged, plus the entries it refused (one line each, naming the file and
line or the task) so the rest of the dataset is still labelled. :func:`write_labels` writes the
labelled dataset as COCO, YOLO segmentation or Label Studio predictions.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DatasetError, InputError
from ..files import write_json

#: Input formats :func:`read_boxes` knows (``auto`` picks one by the input's shape).
INPUT_FORMATS = ("auto", "coco", "yolo", "labelstudio")
#: Output formats of ``sim label --format`` and the mask encoding each needs from the model
#: run (COCO RLE, or COCO polygons from :func:`serving.formats.polygons.mask_to_polygons`).
OUTPUT_ENCODING = {"rle": "rle", "polygon": "polygon", "yolo": "polygon",
                   "labelstudio": "rle", "labelstudio-polygon": "polygon"}
#: The output format when ``--format`` is not given, by input format.
DEFAULT_OUTPUT = {"coco": "rle", "yolo": "yolo", "labelstudio": "labelstudio"}


@dataclass
class BoxSet:
    """A box dataset read from any format.

    Attributes:
        dataset: COCO-shaped dict (see the module docstring); boxes in original pixels of the
            EXIF-rotated image, which is the frame every format here uses.
        source: the format it was read from (``coco``, ``yolo``, ``labelstudio``).
        path: the file or folder it was read from.
        skipped: ``(where, reason)`` of each refused entry (a YOLO line, a Label Studio
            task or rectangle), ``where`` naming the file and line or the task id.
        extra: what the writer of the same format needs to write the labels back (Label
            Studio tasks, YOLO class names).
    """

    dataset: dict[str, Any]
    source: str
    path: Path
    skipped: list[tuple[str, str]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def detect_format(path: str | os.PathLike, what: str = "annotations") -> str:
    """``coco``, ``yolo`` or ``labelstudio`` from the input's shape: a folder is YOLO, a JSON
    list is a Label Studio export, a JSON object with ``images`` is COCO. Raises
    :class:`InputError` (one line) for anything else."""
    p = Path(path)
    if p.is_dir():
        return "yolo"
    if not p.is_file():
        raise InputError(f"{what} {p}: file not found; check the path")
    try:
        with p.open("rb") as fh:
            head = fh.read(4096).decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    except OSError as exc:
        raise InputError(f"{what} {p}: cannot be read ({exc.strerror or exc})") from None
    if head.startswith("["):
        return "labelstudio"
    if head.startswith("{"):
        return "coco"
    raise InputError(f"{what} {p}: neither a COCO JSON (an object with 'images'), a Label "
                     "Studio JSON export (a list of tasks) nor a YOLO labels folder; pass one "
                     "of those, or name it with --input-format")


def read_boxes(path: str | os.PathLike, images: str | os.PathLike, fmt: str = "auto",
               what: str = "annotations") -> BoxSet:
    """Read a box dataset in ``fmt`` (``auto``: :func:`detect_format`).

    ``images`` is the image folder: the YOLO and Label Studio readers look up each image's
    size (EXIF-rotated) there to turn normalised or percent boxes into pixels.
    """
    if fmt not in INPUT_FORMATS:
        raise InputError(f"--input-format {fmt}: choose one of {', '.join(INPUT_FORMATS)}")
    kind = detect_format(path, what) if fmt == "auto" else fmt
    if kind == "coco":
        from .coco import read_coco_json

        return BoxSet(read_coco_json(path, what), "coco", Path(path))
    if kind == "yolo":
        from .yolo import read_yolo

        return read_yolo(path, images)
    from .labelstudio import read_labelstudio

    return read_labelstudio(path, images)


def output_format(fmt: str | None, source: str) -> str:
    """The output format: ``fmt`` when given (checked), else the input format's own."""
    if fmt is None or fmt == "auto":
        return DEFAULT_OUTPUT[source]
    if fmt not in OUTPUT_ENCODING:
        raise InputError(f"--format {fmt}: choose one of {', '.join(OUTPUT_ENCODING)}")
    return fmt


def write_labels(out: Path, labelled: dict[str, Any], boxes: BoxSet, fmt: str,
                 images: Path, options: dict[str, Any] | None = None) -> list[str]:
    """Write the labelled COCO dataset ``labelled`` (``boxes.dataset`` with ``segmentation``,
    ``area`` and ``score`` on each labelled annotation) to ``out`` in ``fmt``.

    ``rle``/``polygon``: the COCO JSON itself. ``yolo``: a YOLO segmentation dataset folder
    (:func:`serving.formats.yolo.write_yolo_seg`). ``labelstudio``/``labelstudio-polygon``:
    Label Studio tasks with predictions (:func:`serving.formats.labelstudio.write_predictions`).
    ``options``: ``label_config`` (a Label Studio labelling config, for the result names) and
    ``model_version``. Returns notes for the user (masks a format could not hold).
    """
    options = options or {}
    if fmt in ("rle", "polygon"):
        write_json(out, labelled)
        return []
    if fmt == "yolo":
        from .yolo import write_yolo_seg

        return write_yolo_seg(out, labelled, boxes, images)
    from .labelstudio import write_predictions

    kind = "polygon" if fmt.endswith("polygon") else "brush"
    return write_predictions(out, labelled, boxes, kind, options.get("label_config"),
                             options.get("model_version", "sim"))


def labelled_dataset(dataset: dict[str, Any], results: list[dict[str, Any]],
                     encoding: str) -> dict[str, Any]:
    """``dataset`` with each prompted result's mask (COCO RLE), ``area`` and ``score`` on the
    annotation its ``prompt_id`` names (``sim predict --boxes`` results), as ``encoding``
    (``rle``, or ``polygon``: :func:`serving.formats.polygons.mask_to_polygons`, RLE kept
    where a mask has no polygon)."""
    from pycocotools import mask as mask_util

    out = copy.deepcopy(dataset)
    by_id = {ann["id"]: ann for ann in out["annotations"]}
    for res in results:
        ann = by_id.get(res.get("prompt_id"))
        if ann is None:
            continue
        rle = dict(res["segmentation"])
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
        segm: Any = res["segmentation"]
        if encoding == "polygon":
            from .polygons import mask_to_polygons

            segm = mask_to_polygons(mask_util.decode(rle).astype(bool)) or segm
        ann.update(segmentation=segm, area=int(mask_util.area(rle)), score=res["score"])
    return out


def read_text_lines(path: Path, what: str) -> list[str]:
    """The lines of a small UTF-8 text file; :class:`DatasetError` naming it if unreadable."""
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise DatasetError(f"{what} {path}: cannot be read ({reason}); fix or re-export it") \
            from None


def read_json_file(path: Path, what: str) -> Any:
    """A JSON file's content; :class:`DatasetError` (one line, naming it) if it is not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise DatasetError(f"{what} {path}: file not found; check the path") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise DatasetError(f"{what} {path}: not valid JSON ({reason}); fix or re-export it") \
            from None


def upright_size(path: Path) -> tuple[int, int] | None:
    """(width, height) of an image file after EXIF rotation, from its header only (nothing
    is decoded); ``None`` when it cannot be read (the job that loads it reports why)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            w, h = img.size
            orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - unreadable: reported when the image is loaded
        return None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)
