"""The pipeline ``predict`` and ``label`` share: images -> decode pool -> batches -> results.

A :class:`Job` is one image to process (automatically, or with the prompt boxes of its COCO
annotations); :func:`run_jobs` decodes images ahead in threads, checks them against their
COCO entry, turns annotations into checked prompts, runs the model a batch at a time with
per-image failure isolation (:func:`serving.cli.common.run_batch`) and yields one
:class:`Outcome` per job, in order. The commands decide what to write for each outcome.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BoxError, SimError
from ..formats.coco import check_image_size, coco_box, unknown_categories
from ..inference.images import load_image
from ..prediction import Prediction
from ..prompts import ALL, Prompt, ScoreThreshold
from ..segmenter import Segmenter
from .common import one_line, prefetch, report, run_batch


@dataclass(frozen=True)
class Job:
    """One image to process.

    Attributes:
        key: identifies the job in the progress log (the image path, or the COCO image id).
        path: the image file.
        fingerprint: hash of what the result depends on (file stamp, annotations).
        entry: its COCO ``images`` entry (width/height are checked), or ``None``.
        anns: the annotations whose boxes prompt the model; ``None`` runs automatic mode.
        skip: nothing to compute (``label`` on an image without boxes): not even decoded.
    """

    key: str
    path: Path
    fingerprint: str
    entry: dict[str, Any] | None = None
    anns: list[dict[str, Any]] | None = None
    skip: bool = False


@dataclass
class Outcome:
    """What became of one job: its image and prediction, or the one-line reason it failed.

    ``prompt_ids``: annotation id of each prediction row (prompted mode); ``rejected``:
    ``{"id", "reason"}`` of each annotation whose box was refused.
    """

    job: Job
    image: np.ndarray | None = None
    prediction: Prediction | None = None
    error: str | None = None
    prompt_ids: list[Any] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)


#: Class index of an annotation's category for the model (-1: let the model predict it).
ClassOf = Callable[[dict[str, Any]], int]


def class_lookup(categories: Sequence[dict[str, Any]], class_names: Sequence[str]) -> ClassOf:
    """Map a COCO annotation to the model's class index by category *name* (-1 when the
    category is unknown to the model, so the model predicts the class)."""
    names = {c["id"]: str(c["name"]) for c in categories}
    index = {name: i for i, name in enumerate(class_names)}
    return lambda ann: index.get(names.get(ann.get("category_id"), ""), -1)


def note_unknown_categories(coco: dict[str, Any]) -> None:
    """Say once how many annotations name a category missing from ``categories``."""
    unknown = unknown_categories(coco)
    if unknown:
        ids = ", ".join(str(c) for c in sorted(unknown)[:5])
        report(f"note: {sum(unknown.values())} annotations have a category_id that is not in "
               f"'categories' ({ids}); the model predicts their class")


def _prompt(seg: Segmenter, outcome: Outcome, class_of: ClassOf) -> Prompt:
    """The job's annotations as one checked :class:`Prompt` (``seg.check_prompt``): each
    annotation's box is checked alone first (:func:`coco_box`), so a refused box goes to
    ``outcome.rejected`` and the others are kept."""
    assert outcome.image is not None and outcome.job.anns is not None
    boxes, labels = [], []
    for ann in outcome.job.anns:
        try:
            boxes.append(coco_box(ann, outcome.image.shape[:2]))
        except BoxError as exc:
            outcome.rejected.append({"id": ann["id"], "reason": str(exc)})
            continue
        labels.append(class_of(ann))
        outcome.prompt_ids.append(ann["id"])
    return seg.check_prompt(np.array(boxes, np.float32).reshape(-1, 4),
                            np.array(labels, np.int64), outcome.image.shape[:2])


def _load(job: Job) -> np.ndarray:
    image = load_image(job.path)
    if job.entry is not None:
        check_image_size(job.entry, image, str(job.path))
    return image


def _run(seg: Segmenter, batch: list[Outcome], class_of: ClassOf, batch_size: int,
         score_threshold: ScoreThreshold) -> None:
    """Predict ``batch``; each outcome gets its prediction or its one-line error (a prompt
    refused as a whole, e.g. over the mask-pixel limit, fails its image alone)."""
    ready: list[tuple[Outcome, Prompt | None]] = []
    for o in batch:
        try:
            ready.append((o, None if o.job.anns is None else _prompt(seg, o, class_of)))
        except SimError as exc:
            o.error = one_line(exc)
    preds = run_batch(seg, [o.image for o, _ in ready], [p for _, p in ready],  # type: ignore[misc]
                      batch_size, score_threshold)
    for (outcome, _), pred in zip(ready, preds, strict=True):
        if isinstance(pred, Exception):
            outcome.error = one_line(pred)
        else:
            outcome.prediction = pred


def run_jobs(seg: Segmenter, jobs: Iterable[Job], class_of: ClassOf, batch_size: int = 4,
             workers: int = 2, score_threshold: ScoreThreshold = ALL) -> Iterator[Outcome]:
    """Process ``jobs`` and yield their outcomes in order (see the module docstring).

    ``workers`` decoding threads keep at most ``2 * batch_size + workers`` images decoded
    ahead, so memory does not grow with the number of jobs.
    """
    def load(job: Job) -> np.ndarray | None:
        return None if job.skip else _load(job)

    batch: list[Outcome] = []
    for job, image, error in prefetch(jobs, load, workers, 2 * batch_size + max(workers, 0)):
        if error is not None:
            yield Outcome(job, error=one_line(error))
            continue
        if image is None:  # a job with nothing to compute
            yield Outcome(job)
            continue
        batch.append(Outcome(job, image=image))
        if len(batch) == batch_size:
            _run(seg, batch, class_of, batch_size, score_threshold)
            yield from batch
            batch = []
    if batch:
        _run(seg, batch, class_of, batch_size, score_threshold)
        yield from batch
