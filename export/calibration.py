"""Calibration images for INT8: a folder or a COCO JSON, sampled, hashed, turned into feeds.

ONNX Runtime's static quantisation (:mod:`export.quantize`) and TensorRT's INT8 calibrator
(:mod:`export.tensorrt`) both read the same :class:`CalibrationSet` through
:func:`calibration_feeds`, which prepares every image exactly as serving does
(:func:`serving.inference.transforms.preprocess`: shorter side to ``min_size``, padding to
multiples of 32, RGB float 0-255) and names the inputs as the exported graph does.

>>> cal = load_calibration_set("data/train_images/", count=64)
>>> cal.sha256, len(cal.paths)
>>> feeds = calibration_feeds(cal, read_sidecar("exported/model.json"), "automatic")
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serving.backends.exported import ExportSidecar, file_sha256
from serving.errors import BoxError, InputError, SimError
from serving.formats.coco import coco_box, read_coco_json
from serving.inference.images import IMAGE_EXTENSIONS, load_image
from serving.inference.transforms import preprocess, resized_shape, scale_boxes

#: Images used when the caller gives no count (ONNX Runtime and TensorRT guides use 100s;
#: 64 keeps calibration of a ResNet-50 at 800x1333 within a few minutes on a CPU).
DEFAULT_CALIBRATION_COUNT = 64
#: Prompt boxes fed per image to the box-prompted graph during calibration.
MAX_CALIBRATION_BOXES = 10


@dataclass(frozen=True)
class CalibrationSet:
    """The images a model is calibrated on.

    ``paths`` are the chosen image files (evenly spaced over the sorted source); ``boxes`` holds,
    per image, (M, 4) float32 XYXY original-pixel boxes from a COCO JSON (``None`` for a folder
    or an image without boxes). ``sha256`` hashes the chosen files' contents in order, so two
    calibrations on the same bytes share it whatever the paths.
    """

    source: str
    paths: tuple[Path, ...]
    boxes: tuple[np.ndarray | None, ...]
    sha256: str
    available: int

    def to_dict(self) -> dict[str, Any]:
        """What the export sidecar records about the calibration."""
        return {"source": self.source, "count": len(self.paths), "available": self.available,
                "sha256": self.sha256, "files": [p.name for p in self.paths]}


def _folder_images(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.is_file()
                  and f.suffix.lower() in IMAGE_EXTENSIONS)


def _resolve(file_name: str, json_path: Path, images_root: Path | None) -> Path:
    roots = [images_root] if images_root else [json_path.parent, json_path.parent / "images"]
    for root in roots:
        if (root / file_name).is_file():
            return root / file_name
    where = " or ".join(str(r) for r in roots)
    raise InputError(
        f"calibration {json_path}: image '{file_name}' not found in {where}; pass the image "
        "folder with --calibration-images"
    )


def _coco_images(json_path: Path, images_root: Path | None) -> tuple[list[Path], list[Any]]:
    """Images of a COCO JSON (sorted by file name) and their boxes (up to 10 valid ones)."""
    data = read_coco_json(json_path, what="calibration")
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    entries = sorted(data["images"], key=lambda e: str(e["file_name"]))
    paths, boxes = [], []
    for entry in entries:
        paths.append(Path(str(entry["file_name"])))
        boxes.append((entry, by_image.get(entry["id"], [])))
    return paths, boxes


def _coco_boxes(entry: dict[str, Any], anns: list[dict[str, Any]],
                size: tuple[int, int]) -> np.ndarray | None:
    """Valid boxes of one image (bad ones are skipped: they only steer calibration)."""
    out = []
    for ann in anns:
        try:
            out.append(coco_box(ann, size))
        except BoxError:
            continue
        if len(out) == MAX_CALIBRATION_BOXES:
            break
    return np.stack(out).astype(np.float32) if out else None


def _spaced(n: int, count: int) -> list[int]:
    """``count`` indices evenly spaced over ``range(n)`` (all of them when count >= n)."""
    if count >= n:
        return list(range(n))
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, count)})


def load_calibration_set(source: str | os.PathLike, count: int = DEFAULT_CALIBRATION_COUNT,
                         images_root: str | os.PathLike | None = None,
                         resize: tuple[int, int] | None = None) -> CalibrationSet:
    """Choose and check the calibration images.

    Args:
        source: a folder of images (searched recursively) or a COCO JSON whose ``file_name``
            entries are found under ``images_root`` (default: the JSON's folder, then its
            ``images/`` subfolder).
        count: images to use, evenly spaced over the sorted list (all when fewer exist).
        resize: the model's (min_size, max_size): each image must pass its resize rule (an
            extreme aspect ratio is refused here, not after the fp32 export).

    Every chosen image is decoded once here, so an unreadable file is reported (one line, its
    name) before any slow work. Raises :class:`InputError` for a missing source, an empty
    folder, a JSON without images, a missing or unreadable image or a count below 1.
    """
    src = Path(source)
    if count < 1:
        raise InputError(f"calibration count {count}: must be at least 1")
    root = Path(images_root) if images_root is not None else None
    if root is not None and not root.is_dir():
        raise InputError(f"calibration images {root}: not a folder; check the path")
    coco: list[Any] | None = None
    if src.is_dir():
        paths = _folder_images(src)
    elif src.is_file() and src.suffix.lower() == ".json":
        paths, coco = _coco_images(src, root)
    elif src.is_file():
        raise InputError(f"calibration {src}: not a folder or a .json file; pass a folder of "
                         "images or a COCO JSON")
    else:
        raise InputError(f"calibration {src}: not found; pass a folder of images or a COCO JSON")
    if not paths:
        raise InputError(f"calibration {src}: no images found (looked for "
                         f"{', '.join(IMAGE_EXTENSIONS)}); pass a folder or JSON with images")
    chosen = _spaced(len(paths), count)
    files, boxes, digests = [], [], []
    for i in chosen:
        path = _resolve(str(paths[i]), src, root) if coco is not None else paths[i]
        try:
            image = load_image(path)
            if resize is not None:
                resized_shape(*image.shape[:2], *resize, str(path))
        except SimError as exc:
            raise InputError(f"calibration {exc}") from None
        files.append(path)
        boxes.append(_coco_boxes(*coco[i], image.shape[:2]) if coco is not None else None)
        digests.append(file_sha256(path))
    digest = hashlib.sha256("\n".join(digests).encode()).hexdigest()
    return CalibrationSet(str(src), tuple(files), tuple(boxes), digest, len(paths))


def _canvas(batch: np.ndarray, sizes: list[tuple[int, int]],
            static: list[int] | None) -> tuple[np.ndarray, np.ndarray]:
    """Place a (1, 3, h, w) batch on the export's static (B, 3, H, W) canvas, if it has one
    (other slots hold blank 32x32 images, as :class:`StaticShapeBackend` does)."""
    image_sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    if not static:
        return batch, image_sizes
    b, h, w = static
    if batch.shape[-2] > h or batch.shape[-1] > w:
        raise InputError(f"calibration image padded to {batch.shape[-2]}x{batch.shape[-1]} "
                         f"exceeds the static export size {h}x{w}; re-export with --dynamic")
    canvas = np.zeros((b, 3, h, w), dtype=np.float32)
    canvas[:1, :, : batch.shape[-2], : batch.shape[-1]] = batch
    filled = np.full((b, 2), 32, dtype=np.int64)
    filled[0] = image_sizes[0]
    return canvas, filled


def calibration_feeds(cal: CalibrationSet, sidecar: ExportSidecar,
                      kind: str) -> Iterator[dict[str, np.ndarray]]:
    """One input dict per calibration image for the ``kind`` ("automatic"/"prompt") graph.

    ``images`` (B, 3, H, W) float32 RGB 0-255 zero-padded and ``image_sizes`` (B, 2) int64, as
    :class:`serving.backends.onnxruntime_backend.OnnxRuntimeBackend` feeds them; the prompt
    graph also gets ``boxes`` (B, M, 4) float32 in the network-input frame (the COCO boxes, or
    three default boxes) and ``box_labels`` (B, M) int64 = -1. B is 1 unless the export is static.
    """
    from .verify import default_prompts

    rules = sidecar.input_rules
    static = rules.get("static_shape")
    for path, boxes in zip(cal.paths, cal.boxes):
        image = load_image(path)
        batch, _, sizes = preprocess([image], rules["min_size"], rules["max_size"])
        images, image_sizes = _canvas(batch.numpy(), sizes, static)
        feed = {"images": images, "image_sizes": image_sizes}
        if kind == "prompt":
            prompts = boxes if boxes is not None else default_prompts(*image.shape[:2])
            scaled = scale_boxes(prompts, image.shape[:2], sizes[0])
            feed["boxes"] = np.broadcast_to(scaled, (len(images), *scaled.shape)).copy()
            feed["box_labels"] = np.full(feed["boxes"].shape[:2], -1, dtype=np.int64)
        yield feed
