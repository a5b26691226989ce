"""The result type of every backend: ``Prediction``, in original-image coordinates."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .masks import InstanceMasks


def format_score(value: float) -> str:
    """A score for people to read: two decimals from 0.095 on (and 0), two significant
    digits below (the box-prompted score of a good mask can be a few hundredths), and
    ``<0.001`` under that."""
    if value == 0 or not abs(value) < 0.095:  # (NaN and inf print as such)
        return f"{value:.2f}"
    if abs(value) < 0.001:
        return "<0.001" if value > 0 else ">-0.001"
    return f"{value:#.2g}"


@dataclass(frozen=True, eq=False, init=False)
class Prediction:
    """Instances found in one image (or one per prompt box, in prompt order).

    ``Prediction(boxes, scores, labels, masks, class_names)`` takes ``masks`` either as an
    (N, H, W) bool array or as :class:`serving.masks.InstanceMasks` (per-instance crops, what
    the ``Segmenter`` returns). The masks are kept as crops: memory grows with the masks'
    extents, not with N x H x W.

    Attributes:
        boxes: (N, 4) float32 XYXY in original-image pixels.
        scores: (N,) float32 in [0, 1]. Automatic mode: the detection's score. Box prompts
            (per-box scale on, the default): an estimate of the mask's quality, made to rank
            masks by their IoU with the true object (:mod:`serving.inference.quality`; sort
            ascending to review the worst first); exactly 0 for a mask the model left empty
            and the per-box scale regrew.
        labels: (N,) int64 indices into ``class_names``.
        masks: (N, H, W) bool at the original image size. Built from the crops on first
            access and kept (N x H x W bytes: 12 GB for 256 masks of an 8000x6000 image);
            from then on it is the prediction's masks (edits to it are what :meth:`mask`,
            :attr:`areas`, :meth:`to_coco` and :meth:`select` see). For large images prefer
            :meth:`mask`, :attr:`instance_masks`, :meth:`to_coco` or :attr:`areas`.
        instance_masks: the masks as crops (:class:`serving.masks.InstanceMasks`).
        class_names: names of the model's classes.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...] = ()
    _crops: InstanceMasks = field(default=None, repr=False)  # type: ignore[assignment]
    _dense: list = field(default_factory=list, repr=False)  # [masks] once built

    def __init__(self, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                 masks: np.ndarray | InstanceMasks, class_names: Sequence[str] = ()) -> None:
        if not isinstance(masks, InstanceMasks):
            masks = InstanceMasks.from_dense(masks)
        if not len(boxes) == len(scores) == len(labels) == len(masks):
            raise ValueError(f"{len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels "
                             f"and {len(masks)} masks: need one of each per instance")
        for name, value in (("boxes", boxes), ("scores", scores), ("labels", labels),
                            ("class_names", tuple(class_names)), ("_crops", masks),
                            ("_dense", [])):
            object.__setattr__(self, name, value)

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def masks(self) -> np.ndarray:
        """(N, H, W) bool full-size masks, built on first access (see the class docstring)."""
        if not self._dense:
            self._dense.append(self._crops.dense())
        return self._dense[0]

    @property
    def instance_masks(self) -> InstanceMasks:
        """The masks as per-instance crops (re-cut from :attr:`masks` once that was built)."""
        return InstanceMasks.from_dense(self._dense[0]) if self._dense else self._crops

    def mask(self, i: int) -> np.ndarray:
        """(H, W) bool full-size mask of instance i (H x W bytes; nothing else is built)."""
        return self._dense[0][i].copy() if self._dense else self._crops.mask(i)

    def select(self, index: Any) -> Prediction:
        """The instances picked by ``index`` (slice, int indices or (N,) bool), masks as crops."""
        return Prediction(self.boxes[index], self.scores[index], self.labels[index],
                          self.instance_masks.select(index), self.class_names)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the original image."""
        return self._crops.image_size

    @property
    def areas(self) -> np.ndarray:
        """(N,) int64 mask areas in pixels."""
        if self._dense:
            return self._dense[0].sum(axis=(1, 2), dtype=np.int64)
        return self._crops.areas()

    @property
    def label_names(self) -> list[str]:
        return [self.class_names[i] if i < len(self.class_names) else str(i) for i in self.labels]

    def to_coco(self, image_id: int, category_ids: Sequence[int] | None = None,
                ) -> list[dict[str, Any]]:
        """COCO results: one dict per instance with ``bbox`` (x, y, w, h), ``score``,
        ``category_id`` (``category_ids[label]``, or ``label + 1`` when not given) and an RLE
        ``segmentation`` whose ``counts`` is a str (JSON-ready). Encoded from the crops, one
        instance at a time. Needs pycocotools."""
        results = []
        masks = self.instance_masks
        for i in range(len(self)):
            x1, y1, x2, y2 = (float(v) for v in self.boxes[i])
            rle = masks.rle(i)
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
