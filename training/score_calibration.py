"""What a trained model knows about its own data, stored in its checkpoint's model card.

The card's :class:`~serving.model.card.Calibration` (read by :mod:`serving.inference.domain`,
the pictures, the app and the server) holds:

- ``score_threshold`` and ``f1``: the automatic-mode score threshold that maximises F1 at mask
  IoU 0.5 on the validation split, and that F1 (:func:`serving.formats.cocoeval.best_f1`);
  pictures, the app's slider and the server use it when the user gives no threshold;
- ``prompt_scores``: quantiles of the box-prompted score on the validation boxes, the
  reference that tells an out-of-domain run (scores far below) from a normal one, and
  ``prompt_score``: which definition of that score (:data:`serving.inference.quality.
  SCORE_VERSION`; a reference of another definition is not compared);
  ``auto_scores``: the same for each validation image's best automatic-mode score;
- ``object_sizes``: quantiles of the training boxes' ``sqrt(w * h)`` at the network input,
  next to the model's inference size, so a user's boxes can be compared with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from serving import Segmenter
from serving.inference.domain import box_sizes, quantiles
from serving.inference.quality import SCORE_VERSION
from serving.model.card import Calibration

from .data.coco_dataset import CocoIndex
from .train_config import DataConfig

#: Validation images whose boxes prompt the model for the score reference (enough for
#: stable quantiles, cheap next to the evaluation itself).
PROMPT_IMAGES = 50


def object_sizes(annotations: str | Path | dict[str, Any], min_sizes: Sequence[int],
                 max_size: int) -> dict[str, float]:
    """Quantiles of the boxes' ``sqrt(w * h)`` at the training input (the mean of the
    multi-scale ``min_sizes``, capped by ``max_size``)."""
    index = CocoIndex(annotations)
    size = int(round(float(np.mean(min_sizes))))
    pairs = [(index.boxes[i], index.images[i][1:]) for i in index.boxes]
    return quantiles(box_sizes(pairs, size, max(size, max_size)))


def prompt_scores(segmenter: Segmenter, annotations: str | Path, images: str | Path,
                  max_images: int = PROMPT_IMAGES) -> dict[str, float]:
    """Quantiles of the box-prompted scores on the first ``max_images`` validation images'
    ground-truth boxes (classes given, as ``label`` gives them)."""
    index = CocoIndex(annotations)
    ids = [i for i in index.images if i in index.boxes][:max_images]
    scores: list[float] = []
    for image_id in ids:
        labels = [index.names[int(c)] for c in index.category_ids[image_id]]
        known = [lab if lab in segmenter.class_names else None for lab in labels]
        pred = segmenter.predict(Path(images) / index.images[image_id][0],
                                 boxes=index.boxes[image_id], labels=known)
        scores += [float(s) for s in pred.scores]
    return quantiles(scores)


def auto_scores(segmenter: Segmenter, annotations: str | Path, images: str | Path,
                max_images: int = PROMPT_IMAGES) -> dict[str, float]:
    """Quantiles of each validation image's best automatic-mode score (the reference for
    runs without boxes)."""
    index = CocoIndex(annotations)
    ids = list(index.images)[:max_images]
    best = []
    for image_id in ids:
        pred = segmenter.predict(Path(images) / index.images[image_id][0])
        best.append(float(pred.scores.max()) if len(pred) else 0.0)
    return quantiles(best)


def validation_calibration(segmenter: Segmenter, metrics: dict[str, float],
                           val_json: str | Path, val_images: str | Path) -> Calibration:
    """What a validation run tells: the F1-best score threshold and its F1 (percent) from an
    evaluation's ``metrics`` (``segm/F1_threshold``, ``segm/F1``), and the prompted scores."""
    return Calibration(
        score_threshold=round(float(metrics.get("segm/F1_threshold", 1.0)), 4),
        f1=round(float(metrics.get("segm/F1", 0.0)), 2),
        prompt_scores=prompt_scores(segmenter, val_json, val_images),
        prompt_score=SCORE_VERSION,
        auto_scores=auto_scores(segmenter, val_json, val_images),
        validation=str(val_json),
    )


def calibration(segmenter: Segmenter, metrics: dict[str, float], data: DataConfig,
                sizes: dict[str, float]) -> Calibration:
    """The calibration (see the module docstring) of a model trained on ``data`` and
    validated with ``metrics``; ``sizes``: its :func:`object_sizes`. ``segmenter``'s card
    should hold the same sizes (as training gives it), so that its box prompts run at the
    per-box scale of the saved model and the prompted scores are the ones ``sim label``
    will give."""
    found = validation_calibration(segmenter, metrics, data.val_json, data.val_images)
    return found.merged(Calibration(object_sizes=sizes))
