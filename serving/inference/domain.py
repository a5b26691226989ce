"""Is the user's data like the data the model was trained and validated on?

A model card's :class:`~serving.model.card.Calibration` (written by training's evaluation)
holds:

- ``object_sizes``: quantiles (``p10``, ``p50``, ``p90``) of the training boxes' size
  ``sqrt(width * height)`` in network-input pixels (after the training resize);
- ``prompt_scores``: quantiles of the box-prompted score on the validation boxes (``prompt_score``
  names the score's definition, :data:`serving.inference.quality.SCORE_VERSION`), and
  ``auto_scores`` of each validation image's best automatic-mode score;
- ``score_threshold`` / ``f1``: the automatic-mode score threshold that maximises F1 on the
  validation split (mask IoU 0.5), used by default for pictures, the app and the server.

:func:`box_sizes` measures the same size on a user's boxes at the model's inference size;
:func:`size_advice` and :func:`score_advice` turn a mismatch into one line that states the
numbers and what to do. Nothing here changes a result.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from ..errors import ImageError
from ..model.card import Calibration
from ..prediction import format_score
from .quality import SCORE_VERSION
from .transforms import resized_shape

#: Object sizes further apart than this factor (either way) get an image-size suggestion.
SIZE_FACTOR = 1.5
#: A run whose median prompted score is below this fraction of the validation median is
#: called out of domain.
SCORE_FACTOR = 0.6
#: Fewest prompts whose scores are judged (fewer say too little).
MIN_PROMPTS = 10
QUANTILES = {"p10": 10, "p50": 50, "p90": 90}


def quantiles(values: Iterable[float]) -> dict[str, float]:
    """``{"p10", "p50", "p90"}`` of ``values`` (empty -> ``{}``), rounded to 4 digits."""
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        return {}
    return {k: round(float(np.percentile(arr, q)), 4) for k, q in QUANTILES.items()}


def box_side(boxes: np.ndarray) -> np.ndarray:
    """(M, 4) XYXY boxes -> (M,) float64 ``sqrt(w * h)`` in the boxes' own frame (0 for a
    reversed or empty box): the one measure of an object's size."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.sqrt(np.clip(boxes[:, 2] - boxes[:, 0], 0, None)
                   * np.clip(boxes[:, 3] - boxes[:, 1], 0, None))


def box_sizes(boxes_and_sizes: Iterable[tuple[np.ndarray, tuple[int, int]]],
              min_size: int, max_size: int) -> np.ndarray:
    """``sqrt(w * h)`` of every box at the network input.

    Args:
        boxes_and_sizes: per image, (M, 4) XYXY boxes in original pixels and the image's
            (height, width).
        min_size / max_size: the resize rule (shorter side / longer-side cap).

    Returns:
        (N,) float64 sizes in network-input pixels. Images the resize rule refuses (an
        extreme aspect ratio) are left out: their own processing reports them.
    """
    out = []
    for boxes, (h, w) in boxes_and_sizes:
        try:
            scale = resized_shape(h, w, min_size, max_size)[0] / h
        except ImageError:
            continue
        out.append(box_side(boxes) * scale)
    return np.concatenate(out) if out else np.zeros(0)


def suggested_size(ratio: float, min_size: int, max_size: int) -> tuple[int, int]:
    """Inference ``(min_size, max_size)`` scaled by ``ratio`` (multiples of 32, 64-4096)."""
    def scale(v: int) -> int:
        return int(min(max(round(v * ratio / 32) * 32, 64), 4096))

    return scale(min_size), scale(max_size)


def size_advice(calibration: Calibration, sizes: np.ndarray, min_size: int,
                max_size: int) -> str | None:
    """One line when the input's median object is ``SIZE_FACTOR`` times smaller or larger
    than the training data's at the network input, suggesting an inference size; else None."""
    train = calibration.object_sizes.get("p50")
    if not train or sizes.size == 0:
        return None
    mine = float(np.median(sizes))
    ratio = train / max(mine, 1e-6)
    if 1 / SIZE_FACTOR <= ratio <= SIZE_FACTOR:
        return None
    lo, hi = suggested_size(ratio, min_size, max_size)
    way = "smaller" if ratio > 1 else "larger"
    return (f"object size: the median box is {mine:.0f} px at the model's input size "
            f"({min_size}/{max_size}), {ratio if ratio > 1 else 1 / ratio:.1f}x {way} than in "
            f"training ({train:.0f} px); try --image-size {lo} {hi} (box-prompted masks "
            "usually gain up to about 1.25x; check on a few images with masks)")


def score_advice(calibration: Calibration, scores: Iterable[float], mode: str = "prompt",
                 min_count: int = MIN_PROMPTS, version: str | None = SCORE_VERSION,
                 ) -> str | None:
    """One line when the run's median score sits far below the validation median (the model
    has probably never seen images like these); else None.

    ``mode``: ``"prompt"`` (``scores`` are box-prompted scores of definition ``version``:
    :data:`.quality.SCORE_VERSION` with the per-box scale, ``None`` for the model's box score
    of the whole-image path, ``Segmenter.prompt_score``; judged only against a calibration
    whose ``prompt_score`` is the same) or ``"auto"`` (each image's best automatic-mode
    score). ``min_count``: fewest scores worth judging.
    """
    table = calibration.prompt_scores if mode == "prompt" else calibration.auto_scores
    reference = table.get("p50")
    if mode == "prompt" and calibration.prompt_score != version:
        return None  # measured with another definition of the score: not comparable
    values = np.asarray(list(scores), dtype=np.float64)
    if not reference or values.size < min_count:
        return None
    median = float(np.median(values))
    if median >= SCORE_FACTOR * reference:
        return None
    what = "box score" if mode == "prompt" else "best score per image"
    return (f"out of domain: the median {what} is {format_score(median)} on these images "
            f"against {format_score(reference)} on the model's validation images; the model has "
            "probably not seen images like these: train on your own images (docs/your_data.md)")


def calibration_of(segmenter: Any) -> Calibration:
    """The calibration of a ``Segmenter``'s model card (empty for a model without one, or a
    Segmenter built around a live model)."""
    card = getattr(segmenter, "card", None)
    return card.calibration if card is not None else Calibration()
