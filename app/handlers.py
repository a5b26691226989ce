"""The app's request handlers: plain functions over ``serving.Segmenter`` (no Gradio here).

Everything the page and the API endpoints do is here, so it is testable without a server or a
browser: read and check the upload, parse the prompt boxes (the annotator's dicts or a JSON
string), run the segmenter, and write the results (overlay picture, instance table, COCO JSON
with RLE masks, instance-id PNG). Bad input raises :class:`serving.errors.SimError`
subclasses with one-line messages; ``app.ui`` turns them into messages on the page.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from serving import Prediction, Segmenter, load_image
from serving.errors import BoxError, ImageError, InputError
from serving.formats.visualize import draw_predictions, masks_to_label_image
from serving.inference.domain import calibration_of, score_advice
from serving.prompts import DEFAULT_MAX_REQUEST_BOXES, SHOWN_THRESHOLD, Prompt, PromptLimitError

log = logging.getLogger("app")

MODES = ("boxes", "automatic")
#: Label meaning "let the model predict the class" (also accepted: "", None, -1).
AUTO_LABEL = "auto"
TABLE_HEADERS = ["id", "class", "score", "area (px)", "box (x1, y1, x2, y2)"]
#: Result folders older than this are deleted (Gradio has copied the files into its cache).
OUTPUT_TTL_S = 3600.0
#: Backends (by name) whose inference objects must not run two requests at once: a TensorRT
#: execution context is not thread-safe. PyTorch and ONNX Runtime inference are.
_SERIAL_BACKENDS = ("tensorrt",)

BoxesAndLabels = tuple[np.ndarray, list[str | int | None]]


@dataclass(frozen=True)
class SegmentResult:
    """One request's answer.

    Attributes:
        overlay: (H, W, 3) uint8 RGB picture of the masks, boxes and labels over the image.
        rows: the instance table, one ``[id, class, score, area, box]`` row per instance; ``id``
            is 1-based and equals the instance's value in the PNG.
        json_path: COCO JSON (``images``, ``categories``, ``annotations`` with RLE masks).
        png_path: (H, W) uint16 PNG, 0 background, ``id`` for instance ``id``.
        message: a one-line summary for the page.
        coco: the content of ``json_path``.
    """

    overlay: np.ndarray
    rows: list[list[Any]]
    json_path: Path
    png_path: Path
    message: str
    coco: dict[str, Any]


def _peek_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) from the file header without decoding pixels; None when unreadable."""
    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # noqa: BLE001 - load_image gives the real, one-line error
        return None


def read_upload(image: Any, max_side: int) -> np.ndarray:
    """Read an uploaded image and enforce the side limit.

    Args:
        image: file path, bytes, PIL image or (H, W, 3) uint8 array; None when nothing uploaded.
        max_side: largest accepted width or height in pixels.

    Returns:
        (H, W, 3) uint8 RGB (EXIF orientation applied).

    Raises:
        ImageError: nothing uploaded, unreadable or corrupt file, or a side over ``max_side``.
    """
    if image is None:
        raise ImageError("image: nothing uploaded; upload an image or pick an example")
    if isinstance(image, (str, Path)):
        size = _peek_size(image)
        if size is not None and max(size) > max_side:
            raise ImageError(f"image: {size[0]}x{size[1]} px is larger than the {max_side} px "
                             "limit on either side; downscale it and upload again")
    try:
        arr = load_image(image)
    except ImageError as exc:  # name the user's file, not the server's temporary copy
        if isinstance(image, (str, Path)):
            raise ImageError(str(exc).replace(str(image), Path(image).name)) from None
        raise
    h, w = arr.shape[:2]
    if max(h, w) > max_side:
        raise ImageError(f"image: {w}x{h} px is larger than the {max_side} px limit on either "
                         "side; downscale it and upload again")
    return arr


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "es" if noun.endswith("x") else "s")


def _label_value(raw: Any) -> str | int | None:
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", AUTO_LABEL)):
        return None
    if isinstance(raw, bool):
        raise InputError(f"label {raw!r}: give a class name, a class index or '{AUTO_LABEL}'")
    if isinstance(raw, (int, np.integer)):
        return None if int(raw) == -1 else int(raw)
    if isinstance(raw, str):
        return raw.strip()
    raise InputError(f"label {raw!r}: give a class name, a class index or '{AUTO_LABEL}'")


def parse_boxes(items: Sequence[Any] | None) -> BoxesAndLabels:
    """Prompt boxes from any of the forms the page and the API accept.

    Each item is ``[x1, y1, x2, y2]``, ``{"box": [x1, y1, x2, y2], "label": ...}`` or the
    annotator's ``{"xmin", "ymin", "xmax", "ymax", "label"}``; labels are class names, class
    indices, or ``"auto"`` / ``""`` / ``None`` / ``-1`` to let the model predict.

    Returns:
        boxes: (M, 4) float64 XYXY in original pixels (not yet validated or clipped).
        labels: M labels (name, index or None).

    Raises:
        BoxError: an item that is none of the forms above, or not numeric.
    """
    boxes: list[list[float]] = []
    labels: list[str | int | None] = []
    for i, item in enumerate(items or []):
        label: Any = None
        try:
            if isinstance(item, dict) and "box" in item:
                coords, label = list(item["box"]), item.get("label")
            elif isinstance(item, dict):
                coords = [item["xmin"], item["ymin"], item["xmax"], item["ymax"]]
                label = item.get("label")
            else:
                coords = list(item)
            if len(coords) != 4:
                raise ValueError
            boxes.append([float(c) for c in coords])
        except (KeyError, TypeError, ValueError):
            raise BoxError(f"box {i}: {item!r} is not [x1, y1, x2, y2], {{'box': [...], "
                           "'label': ...}} or {'xmin', 'ymin', 'xmax', 'ymax'}") from None
        try:
            labels.append(_label_value(label))
        except InputError as exc:
            raise InputError(f"box {i}: {exc}") from None
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4), labels


def parse_boxes_json(text: str | None) -> BoxesAndLabels:
    """:func:`parse_boxes` of a JSON string (a list of boxes; empty or blank means none).

    Raises:
        BoxError: the text is not JSON, or not a list.
    """
    if text is None or not text.strip():
        return parse_boxes([])
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BoxError(f"boxes: not valid JSON ({exc.msg} at character {exc.pos}); pass a "
                       'list such as [[10, 20, 110, 90], {"box": [5, 5, 50, 60], '
                       '"label": "ring"}]') from None
    if not isinstance(items, list):
        raise BoxError(f"boxes: expected a JSON list of boxes, got {type(items).__name__}")
    return parse_boxes(items)


def coco_document(pred: Prediction, width: int, height: int, file_name: str,
                  ) -> dict[str, Any]:
    """A COCO file (``images``, ``categories``, ``annotations``) for one image's prediction.

    Category ids are class index + 1; each annotation has ``id`` (= the PNG instance id),
    ``bbox`` (x, y, w, h), ``area`` (mask pixels), ``score``, ``iscrowd`` 0 and an RLE
    ``segmentation`` (``counts`` as str), so ``pycocotools.coco.COCO`` loads it.
    """
    anns = pred.to_coco(image_id=1)
    for i, (ann, area) in enumerate(zip(anns, pred.areas, strict=True)):
        ann.update(id=i + 1, area=int(area), iscrowd=0, category_name=pred.label_names[i])
    return {
        "images": [{"id": 1, "file_name": file_name, "width": int(width), "height": int(height)}],
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(pred.class_names)],
        "annotations": anns,
    }


def table_rows(pred: Prediction) -> list[list[Any]]:
    """The instance table: ``[id (1-based), class, score, area px, [x1, y1, x2, y2]]``."""
    names, areas = pred.label_names, pred.areas
    return [[i + 1, names[i], round(float(pred.scores[i]), 3), int(areas[i]),
             ", ".join(f"{v:.0f}" for v in pred.boxes[i])] for i in range(len(pred))]


class Handlers:
    """The app's operations over one :class:`serving.Segmenter`.

    Args:
        segmenter: any loaded model (PyTorch, ONNX Runtime, TensorRT).
        max_side: largest accepted image width/height in pixels.
        output_dir: where result files are written (one sub-folder per request); a temporary
            folder when None.
        max_boxes: the most prompt boxes one request may hold (``--max-boxes``; default
            ``DEFAULT_MAX_REQUEST_BOXES``). Not the model's per-pass ``max_prompt_boxes``:
            more boxes than that run in several passes.
    """

    def __init__(self, segmenter: Segmenter, max_side: int = 4096,
                 output_dir: str | Path | None = None, max_boxes: int | None = None) -> None:
        import tempfile

        self.segmenter = segmenter
        self.max_side = int(max_side)
        self.max_boxes = DEFAULT_MAX_REQUEST_BOXES if max_boxes is None else int(max_boxes)
        self.output_dir = Path(output_dir or tempfile.mkdtemp(prefix="sim_app_"))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        backend = str(segmenter.model_info.get("backend", "")).lower()
        serial = any(name in backend for name in _SERIAL_BACKENDS)
        self._lock = threading.Lock() if serial else None

    @property
    def default_threshold(self) -> float:
        """The page's starting threshold (automatic mode): the model's calibrated one
        (``SHOWN_THRESHOLD``), rounded to the slider's step."""
        return round(float(self.segmenter.score_cut(SHOWN_THRESHOLD) or 0.0), 2)

    def domain_note(self, pred: Prediction, automatic: bool) -> str:
        """`` Warning: ...`` when this image's scores sit far below the model's validation
        scores (an out-of-domain image), else ``""``."""
        calib = calibration_of(self.segmenter)
        if automatic:
            best = [float(pred.scores.max()) if len(pred) else 0.0]
            advice = score_advice(calib, best, "auto", min_count=1)
        else:
            advice = score_advice(calib, pred.scores, "prompt", min_count=1,
                                  version=self.segmenter.prompt_score)
        return f" Warning: {advice}" if advice else ""

    def model_markdown(self) -> str:
        """Model information for the page, as Markdown."""
        info = self.segmenter.model_info
        return (f"**Model** backbone `{info['backbone']}` · backend `{info['backend']}` · "
                f"device `{info['device']}` · classes: {', '.join(info['classes'])} · "
                f"at most {self.max_boxes} boxes per image · images up to "
                f"{self.max_side} px per side")

    def _predict(self, image: np.ndarray, prompt: Prompt | None,
                 threshold: float | None) -> Prediction:
        if self._lock is None:
            return self.segmenter.predict(image, boxes=prompt, score_threshold=threshold)
        with self._lock:
            return self.segmenter.predict(image, boxes=prompt, score_threshold=threshold)

    def _prompt(self, boxes: Sequence[Any] | str | None, shape: tuple[int, int]) -> Prompt:
        """The drawn boxes as a checked prompt (``Segmenter.check_prompt``, at most
        :attr:`max_boxes`)."""
        box_arr, labels = (parse_boxes_json(boxes) if isinstance(boxes, str)
                           else parse_boxes(boxes))
        if not len(box_arr):
            raise BoxError("boxes: none drawn; draw a box around an object, or switch to "
                           "automatic mode")
        try:
            return self.segmenter.check_prompt(box_arr, labels, shape, max_boxes=self.max_boxes)
        except PromptLimitError as exc:
            if exc.what != "max_boxes":
                raise
            raise BoxError(f"boxes: {exc.value} drawn, this app takes at most {exc.limit} per "
                           "image; remove some boxes") from None

    def segment(self, image: Any, boxes: Sequence[Any] | str | None, mode: str = "boxes",
                threshold: float | None = None, file_name: str = "image.png",
                orientation: int = 0) -> SegmentResult:
        """Segment one upload.

        Args:
            image: path, bytes, PIL image or (H, W, 3) uint8 array.
            boxes: prompt boxes in any :func:`parse_boxes` form (or a JSON string of them,
                see :func:`parse_boxes_json`), original pixels of the image after
                ``orientation``. Ignored in automatic mode.
            mode: ``"boxes"`` (one mask per box, in order) or ``"automatic"`` (every instance
                scoring at least ``threshold``).
            threshold: automatic mode's score threshold: a number in [0, 1], ``"all"``, or
                ``"calibrated"``; None = ``SHOWN_THRESHOLD`` (the model's calibrated one).
            orientation: quarter turns clockwise applied in the page's image viewer.

        Raises:
            ImageError, BoxError, InputError: bad upload, bad or too many boxes, bad option.
        """
        if mode not in MODES:
            raise InputError(f"mode '{mode}': choose one of {', '.join(MODES)}")
        arr = read_upload(image, self.max_side)
        if orientation % 4:
            arr = np.ascontiguousarray(np.rot90(arr, k=-(orientation % 4)))
        if mode == "automatic":
            cut = self.segmenter.score_cut(SHOWN_THRESHOLD if threshold is None else threshold)
            pred = self._predict(arr, None, cut)
            what = (f"automatic mode, {_count(len(pred), 'instance')} scoring at least "
                    f"{cut or 0.0:.2f}" + self.domain_note(pred, automatic=True))
        else:
            pred = self._predict(arr, self._prompt(boxes, arr.shape[:2]), None)
            what = f"{_count(len(pred), 'box')} segmented" + self.domain_note(pred, False)
        return self._write(arr, pred, file_name, what)

    def _write(self, arr: np.ndarray, pred: Prediction, file_name: str,
               what: str) -> SegmentResult:
        self._prune()
        out = self.output_dir / uuid.uuid4().hex
        out.mkdir()
        h, w = arr.shape[:2]
        stem = Path(file_name).stem or "image"
        coco = coco_document(pred, w, h, Path(file_name).name or "image.png")
        json_path = out / f"{stem}_coco.json"
        json_path.write_text(json.dumps(coco))
        png_path = out / f"{stem}_instances.png"
        Image.fromarray(masks_to_label_image(pred)).save(png_path)
        overlay = draw_predictions(arr, pred)
        return SegmentResult(overlay, table_rows(pred), json_path, png_path, what, coco)

    def _prune(self) -> None:
        """Delete result folders older than :data:`OUTPUT_TTL_S`."""
        cutoff = time.time() - OUTPUT_TTL_S
        for child in self.output_dir.iterdir():
            try:
                if child.is_dir() and child.stat().st_mtime < cutoff:
                    shutil.rmtree(child, ignore_errors=True)
            except OSError:  # removed by a concurrent request
                continue
