"""Builders: assemble a CondInst from a ModelConfig; named presets in a plain dict."""

from __future__ import annotations

from ..model_config import ModelConfig
from .backbone import BackboneFPN
from .condinst import CondInst
from .heads import DynamicMaskHead, FCOSHead, MaskBranch


def build_condinst(cfg: ModelConfig) -> CondInst:
    """Build the network described by ``cfg`` (weights: random, or ImageNet backbone)."""
    mask_head = DynamicMaskHead(
        mask_channels=cfg.mask_channels,
        channels=cfg.dynamic_channels,
        num_layers=cfg.dynamic_layers,
    )
    return CondInst(
        backbone=BackboneFPN(
            name=cfg.backbone,
            out_channels=cfg.fpn_channels,
            freeze_at=cfg.freeze_at,
            weights=cfg.backbone_weights,
        ),
        head=FCOSHead(
            in_channels=cfg.fpn_channels,
            num_classes=cfg.num_classes,
            num_convs=cfg.head_convs,
            num_params=mask_head.num_params,
            prior_prob=cfg.prior_prob,
        ),
        mask_branch=MaskBranch(
            in_channels=cfg.fpn_channels,
            channels=cfg.mask_branch_channels,
            num_convs=cfg.mask_branch_convs,
            out_channels=cfg.mask_channels,
        ),
        mask_head=mask_head,
        pixel_mean=cfg.pixel_mean,
        pixel_std=cfg.pixel_std,
    )


#: Named architectures (SIM_SPEC section 2): the paper's ResNet-FPN and the CPU default.
MODEL_PRESETS: dict[str, ModelConfig] = {
    "r50_fpn": ModelConfig(backbone="resnet50"),
    "r101_fpn": ModelConfig(backbone="resnet101"),
    "mobilenet_v2_fpn": ModelConfig(backbone="mobilenet_v2", freeze_at=2),
}
