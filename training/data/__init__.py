"""Datasets, augmentation and batching for training.

COCO-format JSON is the one annotation format (:class:`CocoInstanceDataset`); the built-in
synthetic set, the napari nuclei slices and Pascal VOC are converted to it by
``python -m training.data.synthetic``, ``training.data.nuclei`` and ``training.data.voc``.
"""

from .augment import (
    Compose,
    RandomHorizontalFlip,
    ResizeShortestEdge,
    eval_transform,
    hflip_sample,
    resize_sample,
    seed_augmentations,
    train_transform,
)
from .coco_dataset import CocoIndex, CocoInstanceDataset, decode_segmentation, load_coco_boxes, read_json
from .collate import Batch, collate, derive_seed

#: Loaded on first use, so that ``python -m training.data.synthetic`` runs the module once.
_SYNTHETIC = {"SYNTHETIC_CLASSES": "CLASSES", "generate_dataset": "generate_dataset",
              "generate_image": "generate_image"}


def __getattr__(name: str):
    if name in _SYNTHETIC:
        from . import synthetic

        return getattr(synthetic, _SYNTHETIC[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "Batch", "CocoIndex", "CocoInstanceDataset", "Compose", "RandomHorizontalFlip",
    "ResizeShortestEdge", "SYNTHETIC_CLASSES", "collate",
    "decode_segmentation", "derive_seed", "eval_transform", "generate_dataset", "generate_image",
    "hflip_sample", "load_coco_boxes", "read_json", "resize_sample", "seed_augmentations",
    "train_transform",
]
