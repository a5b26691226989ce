"""Configuration dataclasses of the library: the network architecture and inference settings.

``ModelConfig`` describes the architecture only and is stored inside every checkpoint, so a
checkpoint rebuilds its own network. ``InferenceConfig`` holds post-processing thresholds and
input sizes; it is also stored in checkpoints and can be overridden at load time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .errors import InputError

BACKBONES = ("mobilenet_v2", "resnet50", "resnet101", "resnet18")

#: FCOS sizes of interest (SIM_SPEC section 3): level ranges on max(l, t, r, b) in pixels.
SIZES_OF_INTEREST = (64, 128, 256, 512)
STRIDES = (8, 16, 32, 64, 128)


@dataclass
class ModelConfig:
    """CondInst architecture (SIM_SPEC sections 0-2).

    Attributes:
        backbone: one of ``BACKBONES``.
        backbone_weights: ``None`` (random init), ``"imagenet"`` (torchvision's weights from
            the local torch hub cache) or a path to a torchvision state dict file.
        num_classes: number of object classes C.
        fpn_channels: channels of P3-P7 and of the FCOS towers (256 in the paper).
        head_convs: convolutions in each FCOS tower (4 in the paper).
        mask_branch_channels / mask_branch_convs / mask_channels: mask branch (128, 4, 16).
        dynamic_channels / dynamic_layers: dynamic mask head (8 channels, 3 layers).
        freeze_at: 0 trains the whole backbone; 2 freezes the stem and res2 (detectron2's
            FREEZE_AT); for MobileNetV2, 2 freezes the stride-2 and stride-4 blocks.
        pixel_mean / pixel_std: RGB normalisation in 0-255 units (torchvision ImageNet).
    """

    backbone: str = "resnet50"
    backbone_weights: str | None = None
    num_classes: int = 80
    fpn_channels: int = 256
    head_convs: int = 4
    mask_branch_channels: int = 128
    mask_branch_convs: int = 4
    mask_channels: int = 16
    dynamic_channels: int = 8
    dynamic_layers: int = 3
    freeze_at: int = 2
    prior_prob: float = 0.01
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise InputError(
                f"model.backbone={self.backbone!r} is unknown; choose one of {', '.join(BACKBONES)}"
            )
        if self.num_classes < 1:
            raise InputError(f"model.num_classes={self.num_classes} must be at least 1")
        if self.dynamic_layers < 2:
            raise InputError("model.dynamic_layers must be at least 2")
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

    score_threshold: float = 0.05
    pre_nms_topk: int = 1000
    nms_threshold: float = 0.6
    max_detections: int = 100
    mask_threshold: float = 0.5
    min_size: int = 800
    max_size: int = 1333
    prompt_mu: float = 5.0
    prompt_topk: int = 16
    center_radius: float = 1.5
    clip_to_box: bool = True
    max_prompt_boxes: int = 256

    def __post_init__(self) -> None:
        for name in ("score_threshold", "nms_threshold", "mask_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InputError(f"inference.{name}={value} must be within [0, 1]")
        if self.max_detections < 1 or self.pre_nms_topk < 1 or self.prompt_topk < 1:
            raise InputError("inference.max_detections, pre_nms_topk, prompt_topk must be >= 1")
        if self.min_size < 32 or self.max_size < self.min_size:
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
    "SIZES_OF_INTEREST",
    "STRIDES",
    "InferenceConfig",
    "ModelConfig",
    "config_from_dict",
    "config_to_dict",
]
