"""Dense mask loss of SIM's pseudo-label and copy-paste terms: weighted BCE + dice.

The paper defines ``L_pseudo`` and ``L_paste`` as BCE + dice on the mask probabilities. The
authors' code instead feeds sigmoid probabilities into ``binary_cross_entropy_with_logits``
(a double sigmoid, SIM_SPEC section 12, item 4); per "Our decisions" that bug is fixed here:
the BCE takes the logits and the dice takes ``sigmoid(logits)``.

Shapes: ``N`` instances, ``h, w`` the stride-4 mask-logit grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from training.losses.boxinst import DICE_EPS, dice_coefficient, zero_with_grad

__all__ = ["bce_dice_loss"]


def bce_dice_loss(
    mask_logits: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    eps: float = DICE_EPS,
) -> Tensor:
    """Weighted BCE-with-logits plus dice on probabilities, summed (SIM paper, L_pseudo/L_paste).

    ``BCE = sum(w * bce(z, t)) / max(sum(w), 1)`` over all instances and pixels (the
    normaliser is clamped like the pairwise one, SIM_SPEC 12 item 13). The dice term is
    :func:`dice_coefficient` of ``(w * sigmoid(z), w * t)`` per instance, i.e. restricted to
    pixels with ``w > 0``, averaged over the instances that have at least one such pixel.
    With ``weight=None`` every pixel has weight 1.

    Args:
        mask_logits: ``(N, 1, h, w)`` mask logits.
        target: ``(N, h, w)`` float pseudo/paste mask in ``[0, 1]`` (soft targets allowed).
        weight: ``(N, h, w)`` float or bool weight mask in {0, 1} (SIM's W: confident
            pixels inside the box), or ``None``.
        eps: dice denominator epsilon (1e-5).

    Returns:
        float32 scalar ``BCE + dice``; 0 connected to the graph when ``N == 0`` or all
        weights are 0. The caller multiplies by lambda1 / lambda2 and the ramp.
    """
    if mask_logits.shape[0] == 0:
        return zero_with_grad(mask_logits)
    z = mask_logits.float()[:, 0]  # (N, h, w)
    t = target.float()
    if tuple(t.shape) != tuple(z.shape):
        raise ValueError(f"target must be {tuple(z.shape)}, got {tuple(t.shape)}")
    w = torch.ones_like(z) if weight is None else weight.float()
    bce = F.binary_cross_entropy_with_logits(z, t, reduction="none")
    loss_bce = (bce * w).sum() / w.sum().clamp(min=1.0)

    dice = dice_coefficient(z.sigmoid() * w, t * w, eps=eps)  # (N,)
    has_pixels = (w > 0).flatten(1).any(dim=1).float()
    loss_dice = (dice * has_pixels).sum() / has_pixels.sum().clamp(min=1.0)
    return loss_bce + loss_dice
