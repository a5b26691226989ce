"""Pure-tensor training losses: FCOS, BoxInst (projection, pairwise, colour) and SIM's BCE + dice.

See the submodules for shapes; every function runs on the device of its inputs.
"""

from __future__ import annotations

from training.losses.boxinst import (
    boxes_to_bitmasks,
    dice_coefficient,
    feature_similarity,
    pairwise_loss,
    pairwise_warmup,
    projection_loss,
    zero_with_grad,
)
from training.losses.color import image_color_similarity, rgb_to_lab, unfold_wo_center
from training.losses.fcos import centerness_target, fcos_losses, giou_loss_ltrb
from training.losses.mask import bce_dice_loss

__all__ = [
    "bce_dice_loss",
    "boxes_to_bitmasks",
    "centerness_target",
    "dice_coefficient",
    "fcos_losses",
    "feature_similarity",
    "giou_loss_ltrb",
    "image_color_similarity",
    "pairwise_loss",
    "pairwise_warmup",
    "projection_loss",
    "rgb_to_lab",
    "unfold_wo_center",
    "zero_with_grad",
]
