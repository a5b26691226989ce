"""Training configuration: dataclasses (schema + defaults) + YAML experiments + dotted overrides.

``load_config("configs/quickstart_cpu.yaml", ["optim.lr=0.005", "sim.alpha=0.3"])`` returns a
:class:`TrainConfig`. Unknown keys are errors with a did-you-mean suggestion; values are type
checked against the dataclass fields. SIM defaults follow the paper (SIM_SPEC "Our decisions").
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from serving.config import InferenceConfig, ModelConfig
from serving.errors import InputError

#: Shortest default phase (pairwise warm-up, SIM start) in iterations; see
#: :meth:`TrainConfig.scaled_phase`.
PHASE_FLOOR = 100


class ConfigError(InputError):
    """A configuration file or override is invalid."""


@dataclass
class DataConfig:
    """Datasets (COCO JSON) and augmentation (SIM_SPEC section 1)."""

    train_json: str = "data/synthetic/train.json"
    train_images: str = "data/synthetic/images"
    val_json: str | None = "data/synthetic/val.json"
    val_images: str | None = "data/synthetic/images"
    #: Generate the built-in synthetic dataset into the train_json folder when it is missing.
    synthetic_images: int = 0
    synthetic_size: int = 320
    synthetic_seed: int = 0
    #: "shared" (default) or "distinct" (diagnostic variant, training/data/synthetic.py).
    synthetic_background: str = "shared"
    min_sizes: tuple[int, ...] = (640, 672, 704, 736, 768, 800)
    max_size: int = 1333
    flip_prob: float = 0.5
    num_workers: int = 2
    max_val_images: int | None = None


@dataclass
class OptimConfig:
    """Optimiser and schedule (SIM_SPEC section 9: SGD 0.01, momentum 0.9, wd 1e-4)."""

    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_norm: float = 0.0
    batch_size: int = 2
    grad_accum_steps: int = 1
    max_iter: int = 90000
    steps: tuple[int, ...] = (60000, 80000)
    gamma: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    clip_grad_norm: float | None = None


@dataclass
class BoxInstConfig:
    """BoxInst projection + pairwise losses (SIM_SPEC section 6)."""

    projection: bool = True
    pairwise: bool = True
    pairwise_size: int = 3
    pairwise_dilation: int = 2
    color_threshold: float = 0.3
    #: Edge similarity S of the pairwise loss: "color" (BoxInst and the paper: Lab colour) or
    #: "color_feature" (the SIM authors' code: colour times exp(-||f_i - f_j||) of the teacher's
    #: unnormalised mask features, used there with color_threshold 0.1; SIM_SPEC 6.4). The
    #: second needs SIM's teacher (sim.enabled=true).
    pairwise_affinity: str = "color"
    #: None: 10k of 90k iterations, scaled to optim.max_iter (TrainConfig.scaled_phase).
    pairwise_warmup_iters: int | None = None
    bottom_pixels_removed: int = 10
    topk_proposals_per_image: int = 64


@dataclass
class SIMConfig:
    """SIM: prototypes, self-corrected pseudo masks, online copy-paste (SIM_SPEC section 7)."""

    enabled: bool = True
    pseudo_loss: bool = True
    #: False: the pseudo loss keeps only its confident-background labels (blended map below
    #: tau_low inside the box) and drops the foreground ones; the pseudo mask still builds the
    #: copy-paste masks (and the prototypes with prototype_pixels="pseudo"). Our variant, not
    #: the paper's: on the built-in data a third of the teacher's foreground labels are
    #: background and the pseudo loss teaches that error (docs/training_notes.md section 3).
    pseudo_foreground: bool = True
    copy_paste: bool = True
    num_prototypes: int = 10
    #: Temperature of M_S = sigmoid(max_l cos(z, p_l) / tau). The paper's 0.1 saturates M_S
    #: to ~1 over whole boxes when object and background features both have positive cosine
    #: with the prototypes, and the pseudo loss then grows masks to their boxes (mask AP 2.2
    #: vs 11.8 with tau 1, docs/training_notes.md). 1.0 keeps M_S soft like the authors'
    #: code (no temperature); sim.tau=0.1 is the paper's setting.
    tau: float = 1.0
    mu: float = 5.0
    alpha: float = 0.5
    tau_low: float = 0.4
    tau_high_range: tuple[float, float] = (0.7, 0.8)
    #: None: 0.999 for the paper's 90k iterations, i.e. 1 - 90 / max_iter (horizon scaled
    #: with the schedule like the warm-ups), clamped to [0.9, 0.999].
    prototype_momentum: float | None = None
    prototype_pixel_threshold: float = 0.7
    #: Pixels that update the prototypes: "instance" (the authors' code: M_I >
    #: prototype_pixel_threshold inside the box) or "pseudo" (the paper: the pseudo mask M_hat).
    prototype_pixels: str = "instance"
    #: Diagnostic only, not box supervision: M_S := the instance's ground-truth mask, so the
    #: pseudo masks get a perfect semantic map. Loads the training masks; needs copy_paste off
    #: (pasted instances have no ground truth). Measures what the rest of SIM's pseudo-mask path
    #: (blend, thresholds, weights, loss) can do when M_S is right (docs/training_notes.md).
    oracle_semantic_map: bool = False
    #: None: 0.9999 for the paper's 90k iterations, i.e. 1 - 9 / max_iter (a 10k-iteration
    #: EMA horizon scaled with the schedule), clamped to [0.99, 0.9999].
    teacher_momentum: float | None = None
    sinkhorn_epsilon: float = 0.05
    sinkhorn_iters: int = 3
    #: Weight of the pseudo loss. The paper's 0.5 (BCE + dice) grew masks to their boxes on
    #: one of two seeds (mask AP 2.8 vs 15.3 with 0.1; docs/training_notes.md); the authors'
    #: code, whose numbers the paper reports, weighs it 0.3 x min(iter / 270k, 1) <= 0.1 over
    #: the whole 1x schedule. sim.lambda_pseudo=0.5 is the paper's setting.
    lambda_pseudo: float = 0.1
    lambda_paste: float = 1.0
    #: Pseudo and paste losses start here; None: 10k of 90k iterations scaled to max_iter
    #: (TrainConfig.scaled_phase).
    start_iter: int | None = None
    memory_size: int = 100
    paste_fraction: float = 0.25
    paste_min: int = 1
    paste_max: int = 3
    paste_prob: float = 0.5
    #: Copy-paste starts once the memory bank holds this many entries.
    paste_min_bank: int = 10


@dataclass
class TrainConfig:
    """One experiment: model, inference settings, data, optimiser, losses, run options."""

    model: ModelConfig = field(default_factory=ModelConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    boxinst: BoxInstConfig = field(default_factory=BoxInstConfig)
    sim: SIMConfig = field(default_factory=SIMConfig)
    #: "box": box supervision (BoxInst / SIM); "mask": fully supervised CondInst.
    supervision: str = "box"
    output_dir: str = "runs/default"
    seed: int = 0
    mixed_precision: str = "no"
    log_every: int = 20
    eval_every: int = 0
    checkpoint_every: int = 500
    log_images_every: int = 0
    #: Stop training when a loss is NaN/inf (always on; kept as a field for clarity).
    detect_anomaly: bool = True

    def __post_init__(self) -> None:
        if self.supervision not in ("box", "mask"):
            raise ConfigError(f"supervision={self.supervision!r}: use 'box' or 'mask'")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"mixed_precision={self.mixed_precision!r}: use no, bf16 or fp16")
        if self.data.synthetic_background not in ("shared", "distinct"):
            raise ConfigError(f"data.synthetic_background={self.data.synthetic_background!r}: "
                              "use shared or distinct")
        if self.sim.prototype_pixels not in ("instance", "pseudo"):
            raise ConfigError(f"sim.prototype_pixels={self.sim.prototype_pixels!r}: use "
                              "'instance' (M_I > threshold) or 'pseudo' (the pseudo mask)")
        if self.sim.oracle_semantic_map and self.sim.copy_paste:
            raise ConfigError("sim.oracle_semantic_map=true needs sim.copy_paste=false (pasted "
                              "instances have no ground-truth mask)")
        if self.boxinst.pairwise_affinity not in ("color", "color_feature"):
            raise ConfigError(f"boxinst.pairwise_affinity={self.boxinst.pairwise_affinity!r}: "
                              "use 'color' or 'color_feature'")
        if (self.boxinst.pairwise_affinity == "color_feature" and self.supervision == "box"
                and not self.sim.enabled):
            raise ConfigError("boxinst.pairwise_affinity='color_feature' uses the SIM teacher's "
                              "mask features: set sim.enabled=true or use 'color'")
        if self.optim.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"optim.optimizer={self.optim.optimizer!r}: use sgd or adamw")

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


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {list(value)}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in types_:
            raise ConfigError(f"unknown config key '{where}'{_suggest(key, list(types_))}")
        tp = types_[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{where}.")
        else:
            kwargs[key] = _coerce(value, tp, where)
    try:
        return cls(**kwargs)
    except InputError as exc:
        raise ConfigError(str(exc)) from None


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: '{key}' is not a section")
    node[keys[-1]] = value


def _check_dotted(dotted: str) -> None:
    cls: Any = TrainConfig
    parts = dotted.split(".")
    for i, key in enumerate(parts):
        types_ = _field_types(cls)
        if key not in types_:
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"unknown config key '{where}'{_suggest(key, list(types_))}")
        cls = types_[key]
        if i < len(parts) - 1 and not dataclasses.is_dataclass(cls):
            raise ConfigError(f"override {dotted}: '{key}' is not a section")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML experiment file (optional) and apply ``key=value`` dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; see the configs/ folder")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            detail = str(exc).replace("\n", " ")
            raise ConfigError(f"config file {path}: invalid YAML ({detail})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: expected a mapping of sections "
                              f"(model:, data:, optim:, ...), got {type(data).__name__}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': use key=value, e.g. optim.lr=0.005")
        key, raw = item.split("=", 1)
        _check_dotted(key.strip())
        _set_dotted(data, key.strip(), yaml.safe_load(raw))
    return _build(TrainConfig, data, "")


def config_as_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), ready for YAML/JSON."""
    from serving.config import config_to_dict

    return config_to_dict(cfg)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(config_as_dict(cfg), sort_keys=False))
