"""The model card: what a model file says about itself, one typed value for every file.

A checkpoint (``.safetensors`` metadata) and an export sidecar (``.json``) both carry a
:class:`ModelCard`: class names, the network's ``ModelConfig``, the ``InferenceConfig``, the
:class:`Calibration` from validation, the COCO category ids of the classes, the precision and
input rules of an export, and its history (:class:`Provenance`: what made each step, from
which file, when, with which library version). Training, ``sim eval --calibrate`` and every
export write it through :meth:`ModelCard.to_json`; loading reads it through
:meth:`ModelCard.from_json`, which checks every field (:mod:`serving.model.metadata`) after
:func:`migrate` has brought an older layout (format versions 0 and 1: a free ``extra``
object) to this one. Nothing here reads weights.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import CheckpointError
from ..model_config import InferenceConfig, ModelConfig, config_to_dict
from . import metadata as check

#: The card's layout version (checkpoints and sidecars alike). 0/1: calibration, category ids
#: and training details in a free ``extra`` object (sidecars: under ``extra.checkpoint_extra``).
CARD_VERSION = 2
#: What can make a step of a model's history.
MADE_BY = ("train", "save", "evaluate --calibrate", "export onnx", "export int8",
           "export tensorrt", "unknown")
#: Quantile tables of a calibration (``{"p10": ..., "p50": ..., "p90": ...}``).
QUANTILE_TABLES = ("prompt_scores", "auto_scores", "object_sizes")


def library_version() -> str:
    """The installed version of this library (``"unknown"`` when run from a bare checkout)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("sim-boxseg")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class Calibration:
    """What validation measured on the model's own data (every field optional).

    ``score_threshold``: automatic mode's F1-best threshold (mask IoU 0.5), in [0, 1], and
    ``f1`` its F1 in percent; ``prompt_scores`` / ``auto_scores``: quantiles (``p10``, ``p50``,
    ``p90``) of the box-prompted score on the validation boxes and of each validation image's
    best automatic score; ``object_sizes``: quantiles of the training boxes' ``sqrt(w * h)`` in
    network-input pixels; ``validation``: the annotation file they came from.
    """

    score_threshold: float | None = None
    f1: float | None = None
    prompt_scores: Mapping[str, float] = field(default_factory=dict)
    auto_scores: Mapping[str, float] = field(default_factory=dict)
    object_sizes: Mapping[str, float] = field(default_factory=dict)
    validation: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The set fields as JSON-ready values (empty for an uncalibrated model)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and value != {}:
                out[f.name] = dict(value) if isinstance(value, Mapping) else value
        return out

    @classmethod
    def from_dict(cls, value: Any, where: str) -> Calibration:
        """A checked calibration (see :func:`serving.model.metadata.checked_calibration`);
        keys this version does not know are dropped."""
        data = check.checked_calibration(value, where)
        known = {f.name for f in dataclasses.fields(cls)}
        if data.get("validation") is not None and not isinstance(data["validation"], str):
            raise CheckpointError(f"{where}: calibration validation is not text")
        return cls(**{k: (dict(v) if k in QUANTILE_TABLES else v)
                      for k, v in data.items() if k in known and v is not None})

    def merged(self, newer: Calibration) -> Calibration:
        """This calibration with every field that ``newer`` sets replaced."""
        return dataclasses.replace(self, **{k: getattr(newer, k) for k in newer.to_dict()})


@dataclass(frozen=True)
class Provenance:
    """One step of a model's history: ``made_by`` (one of :data:`MADE_BY`), the ``source``
    file it was made from (``None`` for training), ``created`` (ISO-8601 UTC), the library
    version, and ``details`` (training step and config, exporter and opset, ...)."""

    made_by: str
    source: str | None = None
    created: str | None = None
    library_version: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def now(cls, made_by: str, source: str | None = None, **details: Any) -> Provenance:
        """A step made now by this library."""
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        return cls(made_by, source, created, library_version(), details)

    def to_dict(self) -> dict[str, Any]:
        return {"made_by": self.made_by, "source": self.source, "created": self.created,
                "library_version": self.library_version, "details": dict(self.details)}

    @classmethod
    def from_dict(cls, value: Any, where: str) -> Provenance:
        if not isinstance(value, Mapping) or value.get("made_by") not in MADE_BY:
            raise CheckpointError(f"{where}: a provenance entry is not an object with made_by "
                                  f"one of {', '.join(MADE_BY)}; re-save or re-export")
        texts = {k: value.get(k) for k in ("source", "created", "library_version")}
        details = value.get("details", {})
        if any(v is not None and not isinstance(v, str) for v in texts.values()) or \
                not isinstance(details, Mapping):
            raise CheckpointError(f"{where}: provenance source/created/library_version must "
                                  "be text and details an object; re-save or re-export")
        return cls(value["made_by"], details=dict(details), **texts)


@dataclass(frozen=True)
class ModelCard:
    """A model's self-description (see the module docstring).

    ``category_ids``: the COCO category id of each class (``None`` when unknown);
    ``precision``: "fp32", "fp16" or "int8" (exports; checkpoints are fp32); ``input_rules``:
    an export's preprocessing contract (``None`` for checkpoints); ``history``: oldest step
    first, the last one made this file (:attr:`provenance`).
    """

    class_names: tuple[str, ...]
    model: ModelConfig
    inference: InferenceConfig
    calibration: Calibration = field(default_factory=Calibration)
    category_ids: tuple[int, ...] | None = None
    precision: str = "fp32"
    input_rules: Mapping[str, Any] | None = None
    history: tuple[Provenance, ...] = ()
    format_version: int = CARD_VERSION

    @property
    def provenance(self) -> Provenance:
        """The step that made this file (``made_by="unknown"`` for a card without history)."""
        return self.history[-1] if self.history else Provenance("unknown")

    def step(self, provenance: Provenance, **changes: Any) -> ModelCard:
        """This card after one more step: ``provenance`` appended, ``changes`` applied, the
        format version the current one."""
        return dataclasses.replace(self, history=(*self.history, provenance),
                                   format_version=CARD_VERSION, **changes)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready fields, read back by :meth:`from_json`."""
        return {
            "format_version": CARD_VERSION,
            "class_names": list(self.class_names),
            "model_config": config_to_dict(self.model),
            "inference_config": config_to_dict(self.inference),
            "calibration": self.calibration.to_dict(),
            "category_ids": None if self.category_ids is None else list(self.category_ids),
            "precision": self.precision,
            "input_rules": None if self.input_rules is None else dict(self.input_rules),
            "history": [p.to_dict() for p in self.history],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str, kind: str = "checkpoint",
                  ) -> ModelCard:
        """The checked card of ``data`` (any supported format version; ``kind``:
        "checkpoint" or "export", for :func:`migrate`). Raises ``CheckpointError`` naming
        ``where`` and the field."""
        version = check.checked_version(data.get("format_version", 0), where, CARD_VERSION)
        data = migrate(data, version, kind, where)
        model = check.checked_config(ModelConfig, data.get("model_config"), where)
        history = data.get("history", [])
        if not isinstance(history, list):
            raise CheckpointError(f"{where}: history is not a list; re-save or re-export")
        return cls(
            class_names=check.checked_class_names(data.get("class_names"), where,
                                                  model.num_classes),
            model=model,
            inference=check.checked_config(InferenceConfig, data.get("inference_config"),
                                           where),
            calibration=Calibration.from_dict(data.get("calibration") or {}, where),
            category_ids=check.checked_category_ids(data.get("category_ids"), where,
                                                    model.num_classes),
            precision=check.checked_precision(data.get("precision", "fp32"), where),
            input_rules=check.checked_input_rules(data.get("input_rules"), where),
            history=tuple(Provenance.from_dict(p, where) for p in history),
            format_version=version)


def migrate(data: Mapping[str, Any], version: int, kind: str, where: str) -> dict[str, Any]:
    """The one migration: a card's fields in an older layout -> this version's layout.

    Versions 0 and 1 kept calibration, category ids and training details in ``extra``;
    an export copied its checkpoint's ``extra`` as ``extra.checkpoint_extra`` beside its own
    exporter details. They become ``calibration``, ``category_ids`` and a ``history`` of the
    training step (``made_by="train"`` when the details say so, else ``"unknown"``) and, for
    an export, its export step; keys nobody reads stay in the steps' ``details``.
    """
    if version >= CARD_VERSION:
        return dict(data)
    extra = check.checked_extra(data.get("extra", {}), where)
    trained = dict(extra.pop("checkpoint_extra", None) or {}) if kind == "export" else extra
    history = [_legacy_step(trained)]
    if kind == "export":
        made_by = "export int8" if data.get("precision") == "int8" else "export onnx"
        history.append(Provenance(made_by, details=extra))
    return {**data, "calibration": trained.pop("calibration", {}),
            "category_ids": trained.pop("category_ids", None),
            "history": [p.to_dict() for p in history]}


def _legacy_step(extra: dict[str, Any]) -> Provenance:
    made_by = "train" if "train_config" in extra or "step" in extra else "unknown"
    return Provenance(made_by, details={k: v for k, v in extra.items()
                                        if k not in ("calibration", "category_ids")})
