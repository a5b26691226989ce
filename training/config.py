"""Training configuration: dataclasses (the schema) + presets + YAML experiments + overrides.

``load_config("configs/quickstart_cpu.yaml", ["optim.lr=0.005"], preset="sim_bg")`` returns a
:class:`TrainConfig` built from, in this order: the dataclass defaults, the preset, the file's
keys, the ``key=value`` overrides. The field annotations are the schema: types, ``Literal``
choices and ``Range`` intervals are checked whenever a config is built
(:func:`serving.config.check_fields`, shared with the library's ``ModelConfig`` and
``InferenceConfig``); unknown keys are errors with a did-you-mean suggestion. SIM defaults follow
the paper (SIM_SPEC "Our decisions"); ``docs/training.md`` lists every preset and section.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml

from serving.config import (
    MAX_INPUT_SIDE,
    InferenceConfig,
    ModelConfig,
    Range,
    check_fields,
    config_to_dict,
    schema_hints,
)
from serving.errors import InputError


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 numbers: ``1e-3`` is a float (YAML 1.1 wants
    ``1.0e-3`` and reads ``1e-3`` as a string)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def yaml_value(text: str) -> Any:
    """Parse YAML ``text`` safely (no Python objects), with YAML 1.2 numbers."""
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 (a SafeLoader subclass)


#: Shortest default phase (pairwise warm-up, SIM start) in iterations; see
#: :meth:`TrainConfig.scaled_phase`.
PHASE_FLOOR = 100

#: Named starting points, applied before a config file's keys and the overrides: each is a
#: list of ``key=value`` overrides of the dataclass defaults.
PRESETS: dict[str, tuple[str, ...]] = {
    "sim": (),
    "sim_bg": ("sim.pseudo_foreground=false", "sim.alpha=0.0"),
    "boxinst": ("sim.enabled=false",),
    "mask": ("supervision=mask", "sim.enabled=false"),
}
#: One line per preset (``python -m training --help`` and docs/training.md).
PRESET_HELP: dict[str, str] = {
    "sim": "the paper's SIM: BoxInst + pseudo loss (foreground and background labels, "
           "alpha 0.5) + copy-paste; the defaults",
    "sim_bg": "our variant of SIM: the pseudo loss keeps only its confident-background "
              "labels, alpha 0",
    "boxinst": "BoxInst alone: projection + pairwise losses, no SIM",
    "mask": "fully supervised CondInst from instance masks (the upper bound)",
}

NonNegative = Annotated[int, Range(ge=0)]
Positive = Annotated[int, Range(ge=1)]
Fraction = Annotated[float, Range(ge=0.0, le=1.0)]
Weight = Annotated[float, Range(ge=0.0)]


class ConfigError(InputError):
    """A configuration file or override is invalid."""


@dataclass
class DataConfig:
    """Datasets (COCO JSON) and augmentation (SIM_SPEC section 1)."""

    SECTION: ClassVar[str] = "data"

    train_json: str = "data/synthetic/train.json"
    train_images: str = "data/synthetic/images"
    val_json: str | None = "data/synthetic/val.json"
    val_images: str | None = "data/synthetic/images"
    #: Generate the built-in synthetic dataset into the train_json folder when it is missing.
    synthetic_images: NonNegative = 0
    synthetic_size: Annotated[int, Range(ge=64)] = 320
    synthetic_seed: NonNegative = 0
    min_sizes: tuple[Annotated[int, Range(ge=32, le=MAX_INPUT_SIDE)], ...] = (
        640, 672, 704, 736, 768, 800)
    max_size: Annotated[int, Range(ge=32, le=MAX_INPUT_SIDE)] = 1333
    flip_prob: Fraction = 0.5
    num_workers: NonNegative = 2
    max_val_images: Positive | None = None

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.min_sizes:
            raise ConfigError("data.min_sizes=[]: give at least one training size, e.g. [800]")


@dataclass
class OptimConfig:
    """Optimiser and schedule (SIM_SPEC section 9: SGD 0.01, momentum 0.9, wd 1e-4)."""

    SECTION: ClassVar[str] = "optim"

    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: Annotated[float, Range(gt=0.0)] = 0.01
    momentum: Fraction = 0.9
    weight_decay: Weight = 1e-4
    weight_decay_norm: Weight = 0.0
    batch_size: Positive = 2
    grad_accum_steps: Positive = 1
    max_iter: Positive = 90000
    steps: tuple[NonNegative, ...] = (60000, 80000)
    gamma: Annotated[float, Range(gt=0.0)] = 0.1
    warmup_iters: NonNegative = 1000
    warmup_factor: Fraction = 0.001
    clip_grad_norm: Annotated[float, Range(gt=0.0)] | None = None

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class BoxInstConfig:
    """BoxInst projection + pairwise losses (SIM_SPEC section 6)."""

    SECTION: ClassVar[str] = "boxinst"

    projection: bool = True
    pairwise: bool = True
    pairwise_size: Annotated[int, Range(ge=2)] = 3
    pairwise_dilation: Positive = 2
    color_threshold: Fraction = 0.3
    #: Edge similarity S of the pairwise loss: "color" (BoxInst and the paper: Lab colour) or
    #: "color_feature" (the SIM authors' code: colour times exp(-||f_i - f_j||) of the teacher's
    #: unnormalised mask features, used there with color_threshold 0.1; SIM_SPEC 6.4). The
    #: second needs SIM's teacher (sim.enabled=true).
    pairwise_affinity: Literal["color", "color_feature"] = "color"
    #: None: 10k of 90k iterations, scaled to optim.max_iter (TrainConfig.scaled_phase).
    pairwise_warmup_iters: NonNegative | None = None
    bottom_pixels_removed: NonNegative = 10
    topk_proposals_per_image: Positive = 64

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class SIMConfig:
    """SIM: prototypes, self-corrected pseudo masks, online copy-paste (SIM_SPEC section 7)."""

    SECTION: ClassVar[str] = "sim"

    enabled: bool = True
    pseudo_loss: bool = True
    #: False: the pseudo loss keeps only its confident-background labels (blended map below
    #: tau_low inside the box) and drops the foreground ones; the pseudo mask still builds the
    #: copy-paste masks (and the prototypes with prototype_pixels="pseudo"). Our variant, not
    #: the paper's (preset sim_bg): on the built-in data a third of the teacher's foreground
    #: labels are background and the pseudo loss teaches that error (docs/training_notes.md
    #: section 3).
    pseudo_foreground: bool = True
    copy_paste: bool = True
    num_prototypes: Positive = 10
    #: Temperature of M_S = sigmoid(max_l cos(z, p_l) / tau). The paper's 0.1 saturates M_S
    #: to ~1 over whole boxes when object and background features both have positive cosine
    #: with the prototypes, and the pseudo loss then grows masks to their boxes (mask AP 2.2
    #: vs 11.8 with tau 1, docs/training_notes.md). 1.0 keeps M_S soft like the authors'
    #: code (no temperature); sim.tau=0.1 is the paper's setting.
    tau: Annotated[float, Range(gt=0.0)] = 1.0
    mu: Weight = 5.0
    alpha: Fraction = 0.5
    tau_low: Fraction = 0.4
    tau_high_range: tuple[Fraction, Fraction] = (0.7, 0.8)
    #: None: 0.999 for the paper's 90k iterations, i.e. 1 - 90 / max_iter (horizon scaled
    #: with the schedule like the warm-ups), clamped to [0.9, 0.999].
    prototype_momentum: Fraction | None = None
    prototype_pixel_threshold: Fraction = 0.7
    #: Pixels that update the prototypes: "instance" (the authors' code: M_I >
    #: prototype_pixel_threshold inside the box) or "pseudo" (the paper: the pseudo mask M_hat).
    prototype_pixels: Literal["instance", "pseudo"] = "instance"
    #: None: 0.9999 for the paper's 90k iterations, i.e. 1 - 9 / max_iter (a 10k-iteration
    #: EMA horizon scaled with the schedule), clamped to [0.99, 0.9999].
    teacher_momentum: Fraction | None = None
    sinkhorn_epsilon: Annotated[float, Range(gt=0.0)] = 0.05
    sinkhorn_iters: Positive = 3
    #: Weight of the pseudo loss. The paper's 0.5 (BCE + dice) grew masks to their boxes on
    #: one of two seeds (mask AP 2.8 vs 15.3 with 0.1; docs/training_notes.md); the authors'
    #: code, whose numbers the paper reports, weighs it 0.3 x min(iter / 270k, 1) <= 0.1 over
    #: the whole 1x schedule. sim.lambda_pseudo=0.5 is the paper's setting.
    lambda_pseudo: Weight = 0.1
    lambda_paste: Weight = 1.0
    #: Pseudo and paste losses start here; None: 10k of 90k iterations scaled to max_iter
    #: (TrainConfig.scaled_phase).
    start_iter: NonNegative | None = None
    memory_size: Positive = 100
    paste_fraction: Fraction = 0.25
    paste_min: NonNegative = 1
    paste_max: Positive = 3
    paste_prob: Fraction = 0.5
    #: Copy-paste starts once the memory bank holds this many entries.
    paste_min_bank: NonNegative = 10

    def __post_init__(self) -> None:
        check_fields(self)
        lo, hi = self.tau_high_range
        if lo > hi:
            raise ConfigError(f"sim.tau_high_range={list(self.tau_high_range)}: give "
                              "[low, high] with low <= high")
        if self.paste_min > self.paste_max:
            raise ConfigError(f"sim.paste_min={self.paste_min} is above sim.paste_max="
                              f"{self.paste_max}; lower paste_min or raise paste_max")


@dataclass
class TrainConfig:
    """One experiment: model, inference settings, data, optimiser, losses, run options."""

    SECTION: ClassVar[str] = ""

    model: ModelConfig = field(default_factory=ModelConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    boxinst: BoxInstConfig = field(default_factory=BoxInstConfig)
    sim: SIMConfig = field(default_factory=SIMConfig)
    #: "box": box supervision (BoxInst / SIM); "mask": fully supervised CondInst.
    supervision: Literal["box", "mask"] = "box"
    output_dir: str = "runs/default"
    seed: NonNegative = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    log_every: Positive = 20
    eval_every: NonNegative = 0
    checkpoint_every: NonNegative = 500
    log_images_every: NonNegative = 0

    def __post_init__(self) -> None:
        check_fields(self)
        if (self.boxinst.pairwise_affinity == "color_feature" and self.supervision == "box"
                and not self.sim.enabled):
            raise ConfigError("boxinst.pairwise_affinity='color_feature' uses the SIM teacher's "
                              "mask features: set sim.enabled=true or use 'color'")

    @property
    def uses_sim(self) -> bool:
        """True when SIM's teacher, prototypes and memory bank take part in training."""
        return self.supervision == "box" and self.sim.enabled

    # Phases scale with the schedule (10k of the paper's 90k iterations), with a floor.
    def scaled_phase(self) -> int:
        """Length of the first phase (pairwise warm-up; BoxInst only before SIM starts).

        10k of the paper's 90k iterations, i.e. ``max_iter / 9``, but at least
        ``min(PHASE_FLOOR, max_iter // 3)``. The floor is measured, not cosmetic: the mask head
        needs some hundred absolute steps of projection loss to form blobs inside the boxes;
        a pairwise loss at full weight before that pulls every mask to a constant and the
        projection loss then settles on lines along the image border (a 300-iteration
        BoxInst run with a 33-step warm-up ended at mask AP 0.0; with 100 steps it trained
        normally; docs/training_notes.md). Short test runs keep a phase shorter than a third
        of their schedule.
        """
        return max(1, round(self.optim.max_iter / 9), min(PHASE_FLOOR, self.optim.max_iter // 3))

    @property
    def pairwise_warmup_iters(self) -> int:
        value = self.boxinst.pairwise_warmup_iters
        return self.scaled_phase() if value is None else value

    @property
    def teacher_momentum(self) -> float:
        value = self.sim.teacher_momentum
        return min(max(1 - 9 / self.optim.max_iter, 0.99), 0.9999) if value is None else value

    @property
    def prototype_momentum(self) -> float:
        value = self.sim.prototype_momentum
        return min(max(1 - 90 / self.optim.max_iter, 0.9), 0.999) if value is None else value

    @property
    def sim_start_iter(self) -> int:
        value = self.sim.start_iter
        return self.scaled_phase() if value is None else value


# --------------------------------------------------------------------------- loading
def _suggest(key: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _convert(value: Any, hint: Any) -> Any:
    """YAML data to the annotated shape: lists to tuples (a scalar to a 1-tuple for ``X, ...``),
    integers to floats for float fields. Everything else is checked by ``check_fields``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return _convert(value, args[0])
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in args if a is not type(None)]
        return value if value is None or len(arms) != 1 else _convert(value, arms[0])
    if origin is tuple:
        variable = len(args) == 2 and args[1] is Ellipsis
        if variable and not isinstance(value, (list, tuple)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            return value
        elems = [args[0]] * len(value) if variable else list(args)
        if len(elems) != len(value):
            return tuple(value)
        return tuple(_convert(v, a) for v, a in zip(value, elems))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = schema_hints(cls)
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(f"unknown config key '{where}'{_suggest(key, list(hints))}")
        hint = hints[key]
        kwargs[key] = _build(hint, value, f"{where}.") if dataclasses.is_dataclass(hint) \
            else _convert(value, hint)
    try:
        return cls(**kwargs)
    except InputError as exc:
        raise ConfigError(str(exc)) from None


def _check_dotted(dotted: str) -> None:
    cls: Any = TrainConfig
    parts = dotted.split(".")
    for i, key in enumerate(parts):
        hints = schema_hints(cls)
        if key not in hints:
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"unknown config key '{where}'{_suggest(key, list(hints))}")
        cls = hints[key]
        if i < len(parts) - 1 and not dataclasses.is_dataclass(cls):
            raise ConfigError(f"override {dotted}: '{key}' is not a section")


def _apply_override(data: dict[str, Any], item: str) -> None:
    """Set ``key=value`` (dotted key, YAML value) in the nested dict ``data``."""
    if "=" not in item:
        raise ConfigError(f"override '{item}': use key=value, e.g. optim.lr=0.005")
    dotted, raw = (s.strip() for s in item.split("=", 1))
    _check_dotted(dotted)
    *sections, last = dotted.split(".")
    node = data
    for key in sections:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: '{key}' is not a section")
    try:
        node[last] = yaml_value(raw)
    except yaml.YAMLError:
        node[last] = raw


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top``'s keys over ``base``'s, section by section (new dict)."""
    out = dict(base)
    for key, value in top.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both else value
    return out


def _read_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; see the configs/ folder")
    try:
        data = yaml_value(path.read_text()) or {}
    except yaml.YAMLError as exc:
        detail = str(exc).replace("\n", " ")
        raise ConfigError(f"config file {path}: invalid YAML ({detail})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections "
                          f"(model:, data:, optim:, ...), got {type(data).__name__}")
    return data


def preset_overrides(name: str) -> tuple[str, ...]:
    """The ``key=value`` overrides of preset ``name`` (:data:`PRESETS`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'{_suggest(name, list(PRESETS))}; "
                          f"choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def _split_preset(overrides: Sequence[str]) -> tuple[list[str], str | None]:
    """The overrides without ``preset=NAME``, and the last NAME given that way."""
    rest, name = [], None
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key.strip() == "preset":
            name = value.strip()
        else:
            rest.append(item)
    return rest, name


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                preset: str | None = None) -> TrainConfig:
    """Build a :class:`TrainConfig`: defaults, then the preset, the YAML file (optional), and
    the dotted ``key=value`` overrides, each over the previous.

    The preset is ``preset`` if given, else a ``preset=NAME`` among the overrides, else the
    file's top-level ``preset:`` key.
    """
    data = _read_file(path) if path is not None else {}
    file_preset = data.pop("preset", None)
    overrides, named = _split_preset(overrides)
    name = preset or named or file_preset
    resolved: dict[str, Any] = {}
    for item in preset_overrides(str(name)) if name is not None else ():
        _apply_override(resolved, item)
    resolved = _merge(resolved, data)
    for item in overrides:
        _apply_override(resolved, item)
    return _build(TrainConfig, resolved, "")


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
