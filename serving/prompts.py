"""The request rules of :class:`serving.Segmenter`: a checked prompt, the passes a prompt runs
in, and the score threshold a caller asks for.

Every entry point (the Python API, ``sim predict`` / ``sim label``, the HTTP server, the
Label Studio backend, the app) checks a prompt through :meth:`Segmenter.check_prompt`, which
returns a :class:`Prompt`; the Segmenter takes a ``Prompt`` as already checked. Limits:

- ``InferenceConfig.max_prompt_boxes`` is the most boxes ONE forward pass holds (an exported
  model's box dimension); a prompt with more boxes runs in several passes
  (:func:`passes`) with the same results, in order. It is not a limit on a request.
- ``max_boxes`` (``check_prompt``'s argument; the server's and the app's ``--max-boxes``) is a
  caller's cap on the boxes of one request.
- ``max_mask_pixels`` bounds the pixels one image's masks may cover together (box areas
  summed, a byte each): the memory of the whole request, whatever the number of passes.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any, Literal, Union

import numpy as np

from .errors import BoxError, InputError
from .inference.boxes import BoxesLike, check_mask_pixels, mask_pixels, validate_boxes

LabelsLike = Any  # (M,) ints (class indices, -1 = predict) or class-name strings

#: The default cap on the prompt boxes of one request in the HTTP server and the app (their
#: ``--max-boxes``); not the per-pass limit ``InferenceConfig.max_prompt_boxes``.
DEFAULT_MAX_REQUEST_BOXES = 256

#: The threshold choices by name: the model's calibrated F1-best threshold
#: (``Segmenter.display_threshold``), or every instance the model returns.
CALIBRATED, ALL = "calibrated", "all"
#: Automatic mode's score threshold: ``"calibrated"``, ``"all"`` (also ``None`` or 0), or a
#: number in [0, 1] (keep instances scoring at least it).
ScoreThreshold = Union[float, Literal["calibrated", "all"], None]
#: The default wherever a result is shown to a person: pictures (``sim predict --save-vis``),
#: the app and the HTTP server. The Python API and COCO result files keep ``"all"``.
SHOWN_THRESHOLD: ScoreThreshold = CALIBRATED


class PromptLimitError(BoxError):
    """A prompt over a caller's limit: ``what`` is ``"max_boxes"`` (``value`` boxes) or
    ``"max_mask_pixels"`` (``value`` mask pixels), ``limit`` the limit it passed; ``boxes``
    the number of boxes. Callers with their own wording for a limit (the server's flags)
    render it from these fields."""

    def __init__(self, message: str, what: str, value: int, limit: int, boxes: int) -> None:
        super().__init__(message)
        self.what, self.value, self.limit, self.boxes = what, int(value), int(limit), int(boxes)


@dataclass(frozen=True)
class Prompt:
    """One image's checked prompt (from :meth:`serving.Segmenter.check_prompt`).

    Attributes:
        boxes: (M, 4) float32 XYXY in original pixels, clipped to the image.
        labels: (M,) int64 class indices, -1 = let the model predict the class.
        image_size: (H, W) of the image the boxes were checked against.
        mask_pixels: the pixels the M masks may cover together (box areas summed when masks
            are clipped to their boxes; see :func:`serving.inference.boxes.mask_pixels`).
    """

    boxes: np.ndarray
    labels: np.ndarray
    image_size: tuple[int, int]
    mask_pixels: int

    def __len__(self) -> int:
        return len(self.boxes)


def _class_index(value: Any, i: int) -> int:
    """A label given as a number: an integral class index (bools, NaN, 1.5, {} refused)."""
    number = value.item() if isinstance(value, np.generic) else value
    if isinstance(number, bool) or not isinstance(number, (int, float)) or \
            not float(number).is_integer():
        raise InputError(f"label {i}: {value!r} is not a class index or name; give an integer "
                         "index, a class name, or -1/None to let the model choose")
    return int(number)


def check_labels(labels: LabelsLike, count: int, class_names: Sequence[str]) -> np.ndarray:
    """One class per box: (M,) int64 indices, -1 = predict.

    Args:
        labels: ``None`` (predict every class), or ``count`` entries, each a class index, a
            class name of ``class_names``, or -1/``None``.

    Raises:
        InputError: a wrong count, an unknown name, an index out of range, a non-integer.
    """
    if labels is None:
        return np.full(count, -1, dtype=np.int64)
    if isinstance(labels, (str, bytes)) or not hasattr(labels, "__iter__"):
        raise InputError(f"labels: {type(labels).__name__} given; give a list with one class "
                         "index or name per box")
    values = list(labels)
    if len(values) != count:
        raise InputError(f"labels: {len(values)} given for {count} boxes; give one per box")
    out = np.empty(count, dtype=np.int64)
    for i, value in enumerate(values):
        if value is None:
            out[i] = -1
        elif isinstance(value, str):
            if value not in class_names:
                raise InputError(f"label {i}: unknown class '{value}'; choose one of "
                                 f"{', '.join(class_names)}")
            out[i] = list(class_names).index(value)
        else:
            idx = _class_index(value, i)
            if not -1 <= idx < len(class_names):
                raise InputError(
                    f"label {i}: class index {idx} out of range 0..{len(class_names) - 1}")
            out[i] = idx
    return out


def check_prompt(boxes: BoxesLike, labels: LabelsLike, image_size: tuple[int, int],
                 class_names: Sequence[str], clip_to_box: bool, max_boxes: int | None,
                 max_mask_pixels: int) -> Prompt:
    """:meth:`serving.Segmenter.check_prompt` given the model's classes and settings.

    Raises:
        BoxError: bad boxes (``box i: ...``), more than ``max_boxes``, or masks over
            ``max_mask_pixels``; InputError: bad labels (``label i: ...``).
    """
    count = _box_count(boxes)
    if max_boxes is not None and count > max_boxes:
        raise PromptLimitError(f"boxes: {count} given, the limit is {max_boxes} per request; "
                               "split them over several requests", "max_boxes", count,
                               max_boxes, count)
    valid = validate_boxes(boxes, image_size, max(count, 1))
    try:
        cost = check_mask_pixels(valid, image_size, clip_to_box, max_mask_pixels)
    except BoxError as exc:
        raise PromptLimitError(str(exc), "max_mask_pixels",
                               mask_pixels(valid, image_size, clip_to_box), max_mask_pixels,
                               len(valid)) from None
    return Prompt(valid, check_labels(labels, len(valid), class_names),
                  (int(image_size[0]), int(image_size[1])), cost)


def _box_count(boxes: BoxesLike) -> int:
    """How many boxes ``boxes`` holds (its first dimension; 1 for a single flat box)."""
    try:
        arr = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError):
        return 0  # not numeric: validate_boxes says so
    if arr.ndim == 1 and arr.shape[0] == 4:
        return 1
    return int(arr.shape[0]) if arr.ndim else 0


def passes(count: int, per_pass: int) -> list[slice]:
    """The slices of ``count`` boxes that fit ``per_pass`` boxes a forward pass, in order
    (one empty slice for no boxes)."""
    per_pass = max(int(per_pass), 1)
    return [slice(s, min(s + per_pass, count)) for s in range(0, count, per_pass)] or [slice(0, 0)]


def threshold_value(choice: ScoreThreshold, calibrated: float) -> float | None:
    """The number a threshold choice means: ``None`` keeps everything.

    Args:
        choice: ``"calibrated"`` (-> ``calibrated``), ``"all"`` / ``None`` / 0 (-> ``None``) or
            a number in [0, 1].
        calibrated: the model's calibrated threshold (``Segmenter.display_threshold``).

    Raises:
        InputError: any other value, naming the three accepted forms.
    """
    if choice is None or (isinstance(choice, str) and choice.strip().lower() == ALL):
        return None
    if isinstance(choice, str) and choice.strip().lower() == CALIBRATED:
        return float(calibrated)
    number = choice.item() if isinstance(choice, np.generic) else choice
    if isinstance(number, bool) or not isinstance(number, (int, float)) or \
            not (math.isfinite(number) and 0.0 <= number <= 1.0):
        raise InputError(f"score_threshold {choice!r}: give '{CALIBRATED}' (the model's "
                         f"F1-best threshold), '{ALL}' (every instance) or a number in [0, 1]")
    return float(number) if number > 0 else None


def parse_threshold(text: str) -> ScoreThreshold:
    """A command-line threshold: ``calibrated``, ``all`` or a number in [0, 1] (an
    ``argparse`` ``type``: ``ArgumentTypeError`` names the three forms)."""
    import argparse

    word = text.strip().lower()
    if word in (CALIBRATED, ALL):
        return word
    try:
        number = float(word)
    except ValueError:
        number = math.nan
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: give {CALIBRATED}, {ALL} or a number in "
                                         "[0, 1]")
    return number


# ----------------------------------------------------------------------------- per image
def _per_image(name: str, values: Any, count: int | None) -> Sequence[Any] | None:
    """``values`` as a per-image list (``None`` stays ``None``), its length checked."""
    if values is None:
        return None
    if isinstance(values, (str, bytes, Mapping)) or not (
            hasattr(values, "__len__") and hasattr(values, "__getitem__")):
        raise InputError(f"{name}: expected a list with one entry per image, got "
                         f"{type(values).__name__}")
    if count is not None and len(values) != count:
        raise InputError(f"{name}: {len(values)} entries for {count} images; give one per image")
    return values


def _entry(name: str, values: Sequence[Any] | None, index: int) -> Any:
    """``values[index]`` (``None`` when there is no list); a list too short is an error."""
    if values is None:
        return None
    if index >= len(values):
        raise InputError(f"{name}: {len(values)} entries for more images; give one per image")
    return values[index]


def per_image_requests(images: Iterable[Any], boxes: Any, labels: Any, thresholds: Any,
                       ) -> Iterator[tuple[Any, Any, Any, ScoreThreshold]]:
    """(image, boxes, labels, threshold) per image of a ``predict_stream`` call, every list
    length checked (up front when ``images`` has a length, else as the images arrive and at
    the end). ``thresholds``: one :data:`ScoreThreshold` for all, or a list of one per image."""
    count = len(images) if isinstance(images, Sized) else None
    if labels is not None and boxes is None:
        raise InputError("labels: given without boxes; labels name the class of each prompt "
                         "box, pass boxes too (or drop labels)")
    scalar = thresholds is None or isinstance(thresholds, (numbers.Real, str))
    columns = {"boxes": _per_image("boxes", boxes, count),
               "labels": _per_image("labels", labels, count),
               "score_threshold": None if scalar else _per_image("score_threshold", thresholds,
                                                                   count)}
    index = -1
    for index, image in enumerate(images):
        box, label, threshold = (_entry(name, values, index) for name, values in columns.items())
        if label is not None and box is None:
            raise InputError(f"labels[{index}]: given for image {index}, which has no boxes; "
                             "pass its boxes or None as its labels")
        yield image, box, label, thresholds if scalar else threshold
    for name, values in columns.items():
        if values is not None and len(values) != index + 1:
            raise InputError(f"{name}: {len(values)} entries for {index + 1} images; give one "
                             "per image")
