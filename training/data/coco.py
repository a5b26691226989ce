"""COCO-format instance dataset for box-supervised (``mode="box"``) and mask training.

In box mode the loader never reads an annotation's ``segmentation`` (DESIGN.md section 4):
the key is not accessed at all, so box-only JSON files work and masks cannot leak into
box-supervised training. Category ids are mapped to contiguous labels ``0..C-1`` (sorted by id)
here, at the dataset boundary, and nowhere else.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from serving.errors import DatasetError
from serving.inference.images import load_image

PathOrDict = Union[str, os.PathLike, Mapping[str, Any]]
REQUIRED_KEYS = ("images", "annotations", "categories")


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; a missing file or malformed JSON raises :class:`DatasetError`."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"annotation file {path}: not found; check the path")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"annotation file {path}: malformed JSON at line {exc.lineno} column {exc.colno} "
            f"({exc.msg}); fix the file or regenerate it") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"annotation file {path}: cannot be read ({exc}); check the file"
                           ) from None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class CocoIndex:
    """Validated, indexed content of a COCO annotation file (segmentations untouched).

    Attributes:
        images: image id -> (file_name, height, width).
        boxes: image id -> float32 (M, 4) XYXY boxes in original image pixels, clipped.
        category_ids: image id -> int64 (M,) COCO category ids.
        ann_refs: image id -> list of the M annotation dicts kept (for mask decoding only).
        categories: sorted category ids; names: id -> name.
        num_crowd, num_dropped_boxes: ignored crowd annotations, boxes empty after clipping.
    """

    def __init__(self, source: PathOrDict) -> None:
        if isinstance(source, Mapping):
            self.name, data = "<dict>", source
        else:
            self.name, data = str(source), read_json(source)
        if not isinstance(data, Mapping):
            raise DatasetError(f"annotation file {self.name}: top level must be a JSON object "
                               "with 'images', 'annotations' and 'categories'")
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise DatasetError(f"annotation file {self.name}: missing top-level key(s) "
                               f"{missing}; a COCO file needs {list(REQUIRED_KEYS)}")
        for key in REQUIRED_KEYS:
            if not isinstance(data[key], list):
                raise DatasetError(f"annotation file {self.name}: '{key}' is "
                                   f"{type(data[key]).__name__}; it must be a list (may be empty)")
        self.names: dict[int, str] = {}
        for i, cat in enumerate(data["categories"]):
            cid = cat.get("id") if isinstance(cat, Mapping) else None
            if not isinstance(cid, int) or cid in self.names:
                raise DatasetError(f"annotation file {self.name}: categories[{i}] needs a unique "
                                   "integer 'id'")
            self.names[cid] = str(cat.get("name", cid))
        self.categories = sorted(self.names)
        self.images: dict[int, tuple[str, int, int]] = {}
        for i, img in enumerate(data["images"]):
            fields = [img.get(k) for k in ("id", "file_name", "height", "width")] \
                if isinstance(img, Mapping) else [None]
            if len(fields) != 4 or not isinstance(fields[1], str) or not all(
                    isinstance(v, int) for v in (fields[0], fields[2], fields[3])) \
                    or min(fields[2], fields[3]) < 1:
                raise DatasetError(f"annotation file {self.name}: images[{i}] needs integer "
                                   "'id', 'height' and 'width' (at least 1) and a string "
                                   "'file_name'")
            if fields[0] in self.images:
                raise DatasetError(f"annotation file {self.name}: duplicate image id "
                                   f"{fields[0]}; image ids must be unique")
            self.images[fields[0]] = (fields[1], fields[2], fields[3])
        self.num_crowd = 0
        self.num_dropped_boxes = 0
        per_image: dict[int, list[tuple[list[float], int, Mapping]]] = {}
        for i, ann in enumerate(data["annotations"]):
            self._add(i, ann, per_image)
        self.boxes: dict[int, np.ndarray] = {}
        self.category_ids: dict[int, np.ndarray] = {}
        self.ann_refs: dict[int, list[Mapping]] = {}
        for image_id, items in per_image.items():
            self.boxes[image_id] = np.array([b for b, _, _ in items], dtype=np.float32)
            self.category_ids[image_id] = np.array([c for _, c, _ in items], dtype=np.int64)
            self.ann_refs[image_id] = [a for _, _, a in items]

    def _add(self, index: int, ann: Any, per_image: dict) -> None:
        """Validate annotation ``index`` and append its clipped box to ``per_image``."""
        if not isinstance(ann, Mapping):
            raise DatasetError(f"annotation file {self.name}: annotations[{index}] is not an "
                               "object")
        ann_id = ann.get("id", f"#{index}")
        for key in ("bbox", "image_id", "category_id"):
            if key not in ann:
                raise DatasetError(f"annotation file {self.name}: annotation {ann_id} has no "
                                   f"'{key}'; every annotation needs bbox, image_id, category_id")
        if not isinstance(ann["category_id"], int) or ann["category_id"] not in self.names:
            raise DatasetError(f"annotation file {self.name}: annotation {ann_id} has unknown "
                               f"category id {ann['category_id']!r}; add it to 'categories' or "
                               "fix the annotation")
        if not isinstance(ann["image_id"], int) or ann["image_id"] not in self.images:
            raise DatasetError(f"annotation file {self.name}: annotation {ann_id} references "
                               f"unknown image id {ann['image_id']!r}; add the image to 'images'")
        bbox = ann["bbox"]
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(map(_number, bbox)):
            raise DatasetError(f"annotation file {self.name}: annotation {ann_id} bbox {bbox!r} "
                               "must be 4 finite numbers [x, y, w, h]")
        if ann.get("iscrowd", 0):
            self.num_crowd += 1
            return
        _, height, width = self.images[ann["image_id"]]
        x, y, w, h = (float(v) for v in bbox)
        box = [max(0.0, x), max(0.0, y), min(float(width), x + w), min(float(height), y + h)]
        if box[2] - box[0] <= 0 or box[3] - box[1] <= 0:
            self.num_dropped_boxes += 1
            return
        per_image.setdefault(ann["image_id"], []).append((box, ann["category_id"], ann))


def load_coco_boxes(annotation_file: PathOrDict) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Ground-truth boxes of every image, never reading segmentations.

    Returns:
        image id -> (boxes float32 (M, 4) XYXY original-image pixels clipped to the image,
        category ids int64 (M,)); crowd and empty boxes excluded, images without boxes map to
        empty arrays.
    """
    index = CocoIndex(annotation_file)
    empty = (np.zeros((0, 4), np.float32), np.zeros((0,), np.int64))
    return {i: (index.boxes[i], index.category_ids[i]) if i in index.boxes else empty
            for i in index.images}


def decode_segmentation(segm: Any, height: int, width: int) -> np.ndarray:
    """Polygons, uncompressed or compressed RLE -> bool (height, width) mask (pycocotools)."""
    from pycocotools import mask as mask_utils

    if isinstance(segm, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    elif isinstance(segm, Mapping) and isinstance(segm.get("counts"), list):
        rle = mask_utils.frPyObjects(dict(segm), height, width)
    elif isinstance(segm, Mapping):
        rle = dict(segm)
    else:
        raise ValueError("segmentation must be polygons or an RLE dict")
    if list(rle.get("size", [])) != [height, width]:
        raise ValueError(f"RLE size {rle.get('size')} differs from the image {[height, width]}")
    return mask_utils.decode(rle).astype(bool)


def check_image_files(index: CocoIndex, image_dir: str | os.PathLike,
                      ids: Sequence[int] | None = None, limit: int = 3) -> None:
    """Raise :class:`DatasetError` when image files of ``index`` (its ``ids``, default all)
    are missing from ``image_dir``: checked before training starts, not when a step or the
    final evaluation reaches them. Names up to ``limit`` of them."""
    folder = Path(image_dir)
    ids = list(index.images) if ids is None else list(ids)
    missing = [index.images[i][0] for i in ids if not (folder / index.images[i][0]).is_file()]
    if missing:
        shown = ", ".join(missing[:limit]) + (", ..." if len(missing) > limit else "")
        raise DatasetError(
            f"image folder {folder}: {len(missing)} of {len(ids)} images of {index.name} are "
            f"missing ({shown}); fix the folder or the file_name entries, or remove those "
            "images from the annotations")


class CocoInstanceDataset(Dataset):
    """Images with boxes (and masks in ``mode="mask"``) from a COCO annotation file.

    Args:
        annotation_file: path of a COCO JSON file, or an already-parsed COCO dict.
        image_dir: folder that ``file_name`` entries are relative to.
        mode: ``"box"`` (segmentations never read) or ``"mask"`` (decoded to bool masks).
        transform: callable on the sample dict (see :mod:`training.data.augment`).
        skip_empty: skip images without a usable box (training); False keeps them (evaluation).

    Samples (dicts): ``image`` uint8 (3, H, W) RGB; ``boxes`` float32 (M, 4) XYXY pixels of
    ``image``; ``labels`` int64 (M,) in 0..C-1; ``masks`` bool (M, H, W) (mask mode only);
    ``image_id`` int; ``orig_size`` (H0, W0) of the file; ``image_size`` (H, W) of ``image``.
    Images without a usable box are skipped (``num_skipped_images``).
    """

    def __init__(self, annotation_file: PathOrDict, image_dir: str | os.PathLike,
                 mode: str = "box", transform: Callable[[dict], dict] | None = None,
                 skip_empty: bool = True) -> None:
        if mode not in ("box", "mask"):
            raise DatasetError(f"dataset mode {mode!r}: use 'box' or 'mask'")
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise DatasetError(f"image folder {self.image_dir}: not found; check the path")
        self.mode = mode
        self.transform = transform
        self.index = CocoIndex(annotation_file)
        self.annotation_file = self.index.name
        if mode == "mask":
            for refs in self.index.ann_refs.values():
                for ann in refs:
                    if "segmentation" not in ann:
                        raise DatasetError(
                            f"annotation file {self.annotation_file}: annotation "
                            f"{ann.get('id')} has no 'segmentation'; use mode='box' or add it")
        self.label_to_category_id: list[int] = list(self.index.categories)
        self.category_id_to_label: dict[int, int] = {
            c: i for i, c in enumerate(self.label_to_category_id)}
        self.class_names: list[str] = [self.index.names[c] for c in self.label_to_category_id]
        self.image_ids: list[int] = [i for i in self.index.images
                                     if i in self.index.boxes or not skip_empty]
        self.num_skipped_images = len(self.index.images) - len(self.image_ids)
        if not self.image_ids:
            raise DatasetError(f"annotation file {self.annotation_file}: no image has a usable "
                               "box; check the annotations and the image sizes")
        self.num_crowd = self.index.num_crowd
        self.num_dropped_boxes = self.index.num_dropped_boxes

    def check_files(self) -> None:
        """:func:`check_image_files` for this dataset's images."""
        check_image_files(self.index, self.image_dir, self.image_ids)

    @property
    def num_classes(self) -> int:
        """Number of categories C."""
        return len(self.label_to_category_id)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image_id = self.image_ids[i]
        file_name, height, width = self.index.images[image_id]
        path = self.image_dir / file_name
        array = load_image(path)  # raises ImageError naming the file
        if array.shape[:2] != (height, width):
            raise DatasetError(
                f"image {path}: size {array.shape[1]}x{array.shape[0]} differs from "
                f"{width}x{height} in {self.annotation_file}; fix the JSON or the image")
        boxes, category_ids = self.index.boxes.get(image_id), self.index.category_ids.get(image_id)
        if boxes is None:  # kept only with skip_empty=False
            boxes, category_ids = np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)
        labels = [self.category_id_to_label[int(c)] for c in category_ids]
        sample: dict[str, Any] = {
            "image": torch.from_numpy(array.transpose(2, 0, 1).copy()),
            "boxes": torch.from_numpy(boxes.copy()),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": image_id,
            "orig_size": (height, width),
            "image_size": (height, width),
        }
        if self.mode == "mask":
            sample["masks"] = torch.from_numpy(self._masks(image_id, height, width))
        return self.transform(sample) if self.transform is not None else sample

    def _masks(self, image_id: int, height: int, width: int) -> np.ndarray:
        refs = self.index.ann_refs.get(image_id, [])
        masks = np.zeros((len(refs), height, width), dtype=bool)
        for k, ann in enumerate(refs):
            try:
                masks[k] = decode_segmentation(ann["segmentation"], height, width)
            except (ValueError, TypeError, KeyError, IndexError) as exc:
                raise DatasetError(
                    f"annotation file {self.annotation_file}: annotation {ann.get('id')} has a "
                    f"malformed segmentation ({exc}); fix or remove it") from None
        return masks
