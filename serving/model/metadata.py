"""The field checks of the one validating reader of a model's self-description
(:meth:`serving.model.card.ModelCard.from_json`, for checkpoint metadata and export sidecars).

A model file describes itself (format version, ``ModelConfig``, ``InferenceConfig``, class
names, calibration; sidecars also input rules and precision; older files an ``extra`` object).
A file may be crafted or damaged, so every field is checked here, once, before anything is
built from it: types, ranges (the configs' own schema), finite numbers, nesting depth.
Failures are :class:`~serving.errors.CheckpointError` with one line naming the file and the
field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from ..errors import CheckpointError, SimError
from ..model_config import config_from_dict

#: Precisions an export sidecar may declare.
PRECISIONS = ("fp32", "fp16", "int8")
#: Calibration entries holding quantiles (``{"p10": ..., "p50": ...}``).
_QUANTILE_KEYS = ("prompt_scores", "auto_scores", "object_sizes")


def parse_json(text: Any, where: str, field: str) -> Any:
    """JSON text of one metadata field (checkpoints store each field as text)."""
    if not isinstance(text, str):
        raise CheckpointError(f"{where}: metadata field '{field}' is not text")
    try:
        return json.loads(text)
    except RecursionError:
        raise CheckpointError(f"{where}: metadata field '{field}' is nested too deeply; the "
                              "file is damaged or crafted, re-save or re-export it") from None
    except ValueError as exc:
        raise CheckpointError(f"{where}: metadata field '{field}' is not valid JSON ({exc}); "
                              "re-save or re-export it") from None


def checked_version(value: Any, where: str, supported: int) -> int:
    """The format version (an integer, or its decimal text) between 0 and ``supported``."""
    text = str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
    if not text.isdigit():
        raise CheckpointError(f"{where}: format version {value!r} is not a whole number; the "
                              "file is damaged, re-save or re-export it")
    version = int(text)
    if version > supported:
        raise CheckpointError(f"{where}: format version {version} is newer than this library "
                              f"reads ({supported}); upgrade the library")
    return version


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


def checked_calibration(value: Any, where: str) -> dict[str, Any]:
    """A calibration entry: ``score_threshold`` in [0, 1], ``f1`` a finite number, quantile
    tables of finite numbers (other keys kept as they are)."""
    if not isinstance(value, Mapping):
        raise CheckpointError(f"{where}: calibration is {type(value).__name__}, not an object; "
                              "recalibrate with sim eval --calibrate")
    threshold = value.get("score_threshold")
    if threshold is not None and not (_finite(threshold) and 0.0 <= threshold <= 1.0):
        raise CheckpointError(f"{where}: calibration score_threshold {threshold!r} is not a "
                              "number in [0, 1]; recalibrate with sim eval --calibrate")
    if value.get("f1") is not None and not _finite(value["f1"]):
        raise CheckpointError(f"{where}: calibration f1 {value['f1']!r} is not a number")
    for key in _QUANTILE_KEYS:
        table = value.get(key)
        if table is not None and not (isinstance(table, Mapping)
                                      and all(_finite(v) for v in table.values())):
            raise CheckpointError(f"{where}: calibration {key} is not a table of numbers; "
                                  "recalibrate with sim eval --calibrate")
    return dict(value)


def checked_extra(value: Any, where: str) -> dict[str, Any]:
    """``extra`` of a format version 0/1 file (read only by the migration): an object; its
    calibration (own, or the checkpoint's copied into an export) checked by
    :func:`checked_calibration`."""
    if not isinstance(value, Mapping):
        raise CheckpointError(f"{where}: metadata 'extra' is {type(value).__name__}, not an "
                              "object; re-save or re-export the model")
    extra = dict(value)
    if "calibration" in extra:
        extra["calibration"] = checked_calibration(extra["calibration"], where)
    inner = extra.get("checkpoint_extra")
    if inner is not None:
        extra["checkpoint_extra"] = checked_extra(inner, where)
    return extra


def checked_class_names(value: Any, where: str, num_classes: int) -> tuple[str, ...]:
    """A list of ``num_classes`` non-empty strings."""
    if not isinstance(value, list):
        raise CheckpointError(f"{where}: class names are {type(value).__name__}, not a list")
    for i, name in enumerate(value):
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"{where}: class name {i} is {name!r}; class names must be "
                                  "non-empty text, re-save the model with its names")
    if len(value) != num_classes:
        raise CheckpointError(f"{where}: {len(value)} class names for num_classes="
                              f"{num_classes}; the metadata is inconsistent, re-save it")
    return tuple(value)


def checked_config(cls: type, value: Any, where: str) -> Any:
    """A ``ModelConfig`` or ``InferenceConfig`` from its JSON object, checked by the config's
    own schema."""
    if not isinstance(value, Mapping):
        raise CheckpointError(f"{where}: {cls.__name__} is {type(value).__name__}, not an "
                              "object")
    try:
        return config_from_dict(cls, dict(value), where)
    except (SimError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: {exc}") from None


def checked_category_ids(value: Any, where: str, num_classes: int) -> tuple[int, ...] | None:
    """``None``, or one integer COCO category id per class."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != num_classes or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise CheckpointError(f"{where}: category_ids is not a list of {num_classes} integers "
                              "(one per class); re-save the model")
    return tuple(value)


def checked_input_rules(value: Any, where: str) -> dict[str, Any] | None:
    """An export's ``input_rules`` (``None`` for a checkpoint): an object whose
    ``static_shape`` passes :func:`checked_static_shape`."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise CheckpointError(f"{where}: 'input_rules' must be an object; re-export")
    checked_static_shape(value.get("static_shape"), where)
    return dict(value)


def checked_static_shape(value: Any, where: str) -> tuple[int, int, int] | None:
    """A sidecar's ``input_rules.static_shape``: ``None`` (dynamic) or [batch, height,
    width], positive integers with sides multiples of 32."""
    if value is None:
        return None
    ok = isinstance(value, list) and len(value) == 3 and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    if not ok or value[1] % 32 or value[2] % 32:
        raise CheckpointError(f"{where}: input_rules.static_shape {value!r} is not [batch, "
                              "height, width] (positive, sides multiples of 32); re-export")
    return value[0], value[1], value[2]


def checked_precision(value: Any, where: str) -> str:
    """A sidecar's ``precision``: one of :data:`PRECISIONS`."""
    if value not in PRECISIONS:
        raise CheckpointError(f"{where}: precision {value!r} is not one of "
                              f"{', '.join(PRECISIONS)}; re-export")
    return str(value)
