"""Configuration dataclasses of the library: the network architecture and inference settings.

``ModelConfig`` describes the architecture only and is stored inside every checkpoint, so a
checkpoint rebuilds its own network. ``InferenceConfig`` holds post-processing thresholds and
input sizes; it is also stored in checkpoints and can be overridden at load time.

The field annotations are the schema: ``Literal[...]`` lists the allowed values and
``Annotated[..., Range(...)]`` the allowed interval. :func:`check_fields` enforces both when a
config is built (in ``__post_init__``, so also for configs read from checkpoint metadata), and
``training.config`` reads the same annotations to type-check YAML files and overrides.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from .errors import InputError

Backbone = Literal["mobilenet_v2", "resnet50", "resnet101", "resnet18"]
BACKBONES: tuple[str, ...] = typing.get_args(Backbone)

#: Largest network input side (``min_size`` / ``max_size``, ``--image-size``, training's
#: ``data.min_sizes``): a 4096 x 4096 input already takes several GB in the network.
MAX_INPUT_SIDE = 4096
#: Largest ``max_detections`` (each detection may hold a mask of the whole image).
MAX_DETECTIONS = 1000

#: FCOS sizes of interest (SIM_SPEC section 3): level ranges on max(l, t, r, b) in pixels.
SIZES_OF_INTEREST = (64, 128, 256, 512)
STRIDES = (8, 16, 32, 64, 128)


@dataclass(frozen=True)
class Range:
    """Allowed interval of a numeric config field: ``Annotated[int, Range(ge=1)]``."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def violation(self, value: float) -> str | None:
        """Why ``value`` lies outside the interval (``"must be >= 1"``), or None."""
        low = (self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
        high = (self.le is None or value <= self.le) and (self.lt is None or value < self.lt)
        if low and high:
            return None
        lo = f"[{_num(self.ge)}" if self.ge is not None else \
            f"({_num(self.gt)}" if self.gt is not None else None
        hi = f"{_num(self.le)}]" if self.le is not None else \
            f"{_num(self.lt)})" if self.lt is not None else None
        if lo and hi:
            return f"must be within {lo}, {hi}"
        if lo:
            return f"must be {'>=' if lo[0] == '[' else '>'} {lo[1:]}"
        return f"must be {'<=' if hi[-1] == ']' else '<'} {hi[:-1]}"  # type: ignore[index]


def _num(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _literal_choices(args: tuple[Any, ...]) -> str:
    names = [repr(a) for a in args]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _type_ok(value: Any, tp: type) -> bool:
    if tp is bool or tp is str:
        return isinstance(value, tp)
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if tp is int else isinstance(value, (int, float))


def field_violation(value: Any, hint: Any) -> str | None:
    """Why ``value`` does not fit annotation ``hint`` (its type, ``Literal`` choices or
    ``Range``; recursing into ``X | None`` and tuples), or None when it fits."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Annotated:
        reason = field_violation(value, args[0])
        ranges = [m for m in args[1:] if isinstance(m, Range)]
        return reason or next((r for m in ranges for r in [m.violation(value)] if r), None)
    if origin is Literal:
        return None if value in args else f"use {_literal_choices(args)}"
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None if type(None) in args else "expected a value, got null"
        arms = [a for a in args if a is not type(None)]
        return field_violation(value, arms[0]) if len(arms) == 1 else None
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return "expected a list"
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        elif len(value) != len(args):
            return f"expected {len(args)} values"
        return next((r for v, a in zip(value, args) for r in [field_violation(v, a)] if r), None)
    if hint in _TYPE_NAMES and not _type_ok(value, hint):
        return f"expected {_TYPE_NAMES[hint]}"
    return None


@functools.cache
def schema_hints(cls: type) -> dict[str, Any]:
    """The annotations of dataclass ``cls``'s fields, ``Annotated`` metadata included."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def check_fields(cfg: Any) -> None:
    """Raise :class:`InputError` for the first field of dataclass ``cfg`` outside its schema,
    naming it as ``<cfg.SECTION>.<field>``."""
    section = getattr(cfg, "SECTION", "")
    for name, hint in schema_hints(type(cfg)).items():
        value = getattr(cfg, name)
        reason = field_violation(value, hint)
        if reason:
            where = f"{section}.{name}" if section else name
            shown = "null" if value is None else repr(list(value) if isinstance(value, tuple)
                                                      else value)
            raise InputError(f"{where}={shown}: {reason}")


Positive = Annotated[int, Range(ge=1)]
Probability = Annotated[float, Range(ge=0.0, le=1.0)]


@dataclass
class ModelConfig:
    """CondInst architecture (SIM_SPEC sections 0-2).

    Attributes:
        backbone: one of ``BACKBONES``.
        backbone_weights: ``None`` (random init), ``"imagenet"`` (torchvision's weights from
            the local torch hub cache) or a path to a torchvision state dict file.
        num_classes: number of object classes C (1 to 10,000).
        fpn_channels: channels of P3-P7 and of the FCOS towers (256 in the paper).
        head_convs: convolutions in each FCOS tower (4 in the paper).
        mask_branch_channels / mask_branch_convs / mask_channels: mask branch (128, 4, 16).
        dynamic_channels / dynamic_layers: dynamic mask head (8 channels, 3 layers).
        freeze_at: 0 trains the whole backbone; 2 freezes the stem and res2 (detectron2's
            FREEZE_AT); for MobileNetV2, 2 freezes the stride-2 and stride-4 blocks.
        pixel_mean / pixel_std: RGB normalisation in 0-255 units (torchvision ImageNet).

    The upper bounds are far above any published CondInst and keep a crafted or mistyped
    config from allocating an enormous network.
    """

    SECTION: ClassVar[str] = "model"

    backbone: Backbone = "resnet50"
    backbone_weights: str | None = None
    num_classes: Annotated[int, Range(ge=1, le=10_000)] = 80
    fpn_channels: Annotated[int, Range(ge=1, le=2048)] = 256
    head_convs: Annotated[int, Range(ge=0, le=16)] = 4
    mask_branch_channels: Annotated[int, Range(ge=1, le=2048)] = 128
    mask_branch_convs: Annotated[int, Range(ge=0, le=16)] = 4
    mask_channels: Annotated[int, Range(ge=1, le=256)] = 16
    dynamic_channels: Annotated[int, Range(ge=1, le=256)] = 8
    dynamic_layers: Annotated[int, Range(ge=2, le=16)] = 3
    freeze_at: Annotated[int, Range(ge=0, le=5)] = 2
    prior_prob: Annotated[float, Range(gt=0.0, lt=1.0)] = 0.01
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[Annotated[float, Range(gt=0.0)], Annotated[float, Range(gt=0.0)],
                     Annotated[float, Range(gt=0.0)]] = (58.395, 57.12, 57.375)

    def __post_init__(self) -> None:
        check_fields(self)
        self.pixel_mean = tuple(float(v) for v in self.pixel_mean)  # type: ignore[assignment]
        self.pixel_std = tuple(float(v) for v in self.pixel_std)  # type: ignore[assignment]

    @property
    def num_dynamic_params(self) -> int:
        """Parameters generated per location: 233 for 3 layers of 8 channels and 16 features."""
        c, d = self.dynamic_channels, self.mask_channels + 2
        weights = d * c + c * c * (self.dynamic_layers - 2) + c
        biases = c * (self.dynamic_layers - 1) + 1
        return weights + biases


@dataclass
class InferenceConfig:
    """Post-processing settings (SIM_SPEC section 5) and test-time input size.

    Attributes:
        score_threshold: candidates need ``sigmoid(cls) * sigmoid(ctr)`` above this.
        pre_nms_topk: candidates kept per pyramid level before NMS.
        nms_threshold: IoU of class-aware NMS.
        max_detections: detections kept per image after NMS.
        mask_threshold: probability threshold of the final masks.
        min_size / max_size: test-time resize of the shorter / longer side.
        prompt_mu: ``mu`` of the box-prompted IoU weights ``exp(mu * IoU)`` (paper Eq. 6).
        prompt_topk: locations considered per prompt box (fixed, export friendly).
        center_radius: FCOS centre-sampling radius in strides (1.5).
        clip_to_box: zero prompted masks outside their prompt box.
        max_prompt_boxes: largest number of prompt boxes accepted per image.
    """

    SECTION: ClassVar[str] = "inference"

    score_threshold: Probability = 0.05
    pre_nms_topk: Positive = 1000
    nms_threshold: Probability = 0.6
    max_detections: Annotated[int, Range(ge=1, le=MAX_DETECTIONS)] = 100
    mask_threshold: Probability = 0.5
    min_size: Annotated[int, Range(ge=32, le=MAX_INPUT_SIDE)] = 800
    max_size: Annotated[int, Range(ge=32, le=MAX_INPUT_SIDE)] = 1333
    prompt_mu: Annotated[float, Range(ge=0.0)] = 5.0
    prompt_topk: Positive = 16
    center_radius: Annotated[float, Range(gt=0.0)] = 1.5
    clip_to_box: bool = True
    max_prompt_boxes: Positive = 256

    def __post_init__(self) -> None:
        check_fields(self)
        if self.max_size < self.min_size:
            raise InputError(
                f"inference.min_size={self.min_size}, max_size={self.max_size}: need "
                "32 <= min_size <= max_size"
            )


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass (possibly nested) as plain JSON/YAML-serialisable data."""
    data = dataclasses.asdict(cfg)
    return _listify(data)


def _listify(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _listify(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_listify(v) for v in value]
    return value


def config_from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys raise ``InputError``."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise InputError(
            f"{where}: unknown key(s) {', '.join(unknown)} for {cls.__name__}; "
            f"valid keys are {', '.join(sorted(names))}"
        )
    kwargs = {}
    for key, value in data.items():
        if isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


__all__ = [
    "BACKBONES",
    "MAX_DETECTIONS",
    "MAX_INPUT_SIDE",
    "SIZES_OF_INTEREST",
    "STRIDES",
    "InferenceConfig",
    "ModelConfig",
    "config_from_dict",
    "config_to_dict",
]
