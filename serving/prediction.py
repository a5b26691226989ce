"""The result type of every backend: ``Prediction``, in original-image coordinates."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Prediction:
    """Instances found in one image (or one per prompt box, in prompt order).

    Attributes:
        boxes: (N, 4) float32 XYXY in original-image pixels.
        scores: (N,) float32 in [0, 1].
        labels: (N,) int64 indices into ``class_names``.
        masks: (N, H, W) bool at the original image size.
        class_names: names of the model's classes.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    class_names: tuple[str, ...] = field(default=())

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the original image."""
        return int(self.masks.shape[1]), int(self.masks.shape[2])

    @property
    def areas(self) -> np.ndarray:
        """(N,) int64 mask areas in pixels."""
        return self.masks.sum(axis=(1, 2), dtype=np.int64)  # (0, H, W) gives (0,)

    @property
    def label_names(self) -> list[str]:
        return [self.class_names[i] if i < len(self.class_names) else str(i) for i in self.labels]

    def to_coco(self, image_id: int, category_ids: Sequence[int] | None = None,
                ) -> list[dict[str, Any]]:
        """COCO results: one dict per instance with ``bbox`` (x, y, w, h), ``score``,
        ``category_id`` (``category_ids[label]``, or ``label + 1`` when not given) and an RLE
        ``segmentation`` whose ``counts`` is a str (JSON-ready). Needs pycocotools."""
        from pycocotools import mask as mask_util  # lazy: only COCO output needs it

        results = []
        if len(self):
            rles = mask_util.encode(np.asfortranarray(self.masks.transpose(1, 2, 0).astype(
                np.uint8)))
        for i in range(len(self)):
            x1, y1, x2, y2 = (float(v) for v in self.boxes[i])
            rle = rles[i]
            rle["counts"] = rle["counts"].decode("ascii")
            label = int(self.labels[i])
            cat = int(category_ids[label]) if category_ids is not None else label + 1
            results.append({
                "image_id": int(image_id),
                "category_id": cat,
                "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                "score": round(float(self.scores[i]), 5),
                "segmentation": rle,
            })
        return results
