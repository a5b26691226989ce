"""SIM pseudo masks: blend of the semantic and instance maps, thresholds and weight mask.

SIM_SPEC 7.6 (and the paper's Eq. 7). Inputs are per ground-truth instance on the stride-4
mask-logit grid ``(h, w)``:

- ``M_I``: the teacher's instance map, the IoU-weighted average of the mask probabilities of the
  instance's positive locations (computed by ``serving.inference.assign.weighted_instance_map``);
- ``M_S``: the semantic map from the class prototypes
  (:meth:`training.sim.prototypes.PrototypeMemory.semantic_map`);
- the box mask of the instance.

Everything here is a detached label: the functions run under ``torch.no_grad`` in float32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "PseudoMask",
    "full_resolution_masks",
    "instance_importance",
    "pseudo_masks",
]

# Defaults (SIM_SPEC "Our decisions" and 7.6): alpha of the paper; tau_low, the clamp range of
# the adaptive tau_high and the M_I foreground threshold that defines its target area are the
# code's engineering (the paper gives no values).
ALPHA = 0.5
TAU_LOW = 0.4
TAU_HIGH_RANGE = (0.7, 0.8)
INSTANCE_FG_THRESH = 0.7
# Importance S' = sum(M_I * mask) / (sum(mask) + 1) (SIM_SPEC 7.8, "Paste masks and scores").
IMPORTANCE_SMOOTHING = 1.0


class PseudoMask(NamedTuple):
    """Output of :func:`pseudo_masks` (all ``(M, h, w)`` float32 unless noted).

    Attributes:
        target: ``M_hat`` in {0, 1}: ``blended > tau_high`` inside the box.
        weight: ``W`` in {0, 1}: 1 where ``blended > tau_high`` or ``blended < tau_low``,
            inside the box only; 0 in the ambiguous band and outside the box.
        blended: ``alpha * M_S + (1 - alpha) * M_I`` in ``[0, 1]`` (full map, not masked).
        tau_high: ``(M,)`` float32 threshold used for each instance.
    """

    target: Tensor
    weight: Tensor
    blended: Tensor
    tau_high: Tensor


def _adaptive_tau_high(
    blended: Tensor, m_inst: Tensor, box: Tensor, inst_fg_thresh: float
) -> Tensor:
    """Area-matched ``tau_high`` before clamping (SIM_SPEC 7.6 step 2), vectorised.

    ``n_pos = #(M_I > inst_fg_thresh inside the box)``; the threshold is the value at
    (0-based) rank ``n_pos`` of ``blended * box`` sorted in descending order, so about
    ``n_pos`` pixels lie strictly above it. The rank is clamped to ``[0, h*w - 1]``
    (SIM_SPEC 12 item 13). Returns ``(M,)``.
    """
    flat = (blended * box).flatten(1)  # (M, hw)
    n_pos = ((m_inst > inst_fg_thresh) & (box > 0)).flatten(1).sum(dim=1)
    rank = n_pos.clamp(0, flat.shape[1] - 1)
    ordered = flat.sort(dim=1, descending=True).values
    return ordered.gather(1, rank[:, None])[:, 0]


@torch.no_grad()
def pseudo_masks(
    m_inst: Tensor,
    m_sem: Tensor,
    box_masks: Tensor,
    alpha: float = ALPHA,
    tau_low: float = TAU_LOW,
    tau_high_range: tuple[float, float] = TAU_HIGH_RANGE,
    adaptive_high: bool = True,
    inst_fg_thresh: float = INSTANCE_FG_THRESH,
) -> PseudoMask:
    """Pseudo mask ``M_hat`` and weight ``W`` of each instance (SIM_SPEC 7.6, paper Eq. 7).

    ``blended = alpha * M_S + (1 - alpha) * M_I``: ``alpha`` weighs the **semantic** map, as in
    the paper's Eq. 7 and its ablation (Table 4: ``alpha = 0`` is the instance map alone). The
    spec's code line ``0.5 * M_S + 0.5 * M_I`` cannot tell the two orders apart; we follow the
    paper's order.

    Thresholds, as coded (SIM_SPEC 7.6 steps 2-4): comparisons are strict
    (``blended > tau_high`` is foreground, ``blended < tau_low`` confident background). With
    ``adaptive_high`` ``tau_high`` is area-matched per instance to the count of ``M_I >
    inst_fg_thresh`` inside the box, then clamped to ``tau_high_range``; otherwise it is
    ``tau_high_range[0]`` for every instance. The code averages the per-positive thresholds
    of one GT; here rows are already one per GT (``M_I`` is per GT), so no averaging is needed.

    Args:
        m_inst: ``(M, h, w)`` float instance map ``M_I`` (probabilities).
        m_sem: ``(M, h, w)`` float semantic map ``M_S`` (probabilities).
        box_masks: ``(M, h, w)`` box masks in {0, 1} (bool or float), stride-4 grid.
        alpha: weight of ``M_S`` (0.5).
        tau_low: confident-background threshold (0.4).
        tau_high_range: ``(low, high)`` clamp of the adaptive threshold (0.7, 0.8).
        adaptive_high: area-matched ``tau_high`` (True) or the fixed ``tau_high_range[0]``.
        inst_fg_thresh: the ``M_I`` threshold that defines the matched area (0.7).

    Returns:
        :class:`PseudoMask` with float32 tensors on the inputs' device.
    """
    if m_inst.shape != m_sem.shape or m_inst.shape != box_masks.shape or m_inst.dim() != 3:
        raise ValueError(
            "m_inst, m_sem and box_masks must all be (M, h, w); got "
            f"{tuple(m_inst.shape)}, {tuple(m_sem.shape)}, {tuple(box_masks.shape)}")
    lo, hi = tau_high_range
    if not lo <= hi:
        raise ValueError(f"tau_high_range must be (low, high), low <= high; got {tau_high_range}")
    with torch.autocast(device_type=m_inst.device.type, enabled=False):
        mi = m_inst.float()
        box = (box_masks > 0).float()
        blended = alpha * m_sem.float() + (1.0 - alpha) * mi
        if adaptive_high and mi.shape[0] > 0:
            tau_high = _adaptive_tau_high(blended, mi, box, inst_fg_thresh).clamp(lo, hi)
        else:
            tau_high = torch.full((mi.shape[0],), lo, dtype=torch.float32, device=mi.device)
        fg = blended > tau_high[:, None, None]
        bg = blended < tau_low
        target = fg.float() * box
        weight = (fg | bg).float() * box
    return PseudoMask(target=target, weight=weight, blended=blended, tau_high=tau_high)


@torch.no_grad()
def instance_importance(
    prob: Tensor, mask: Tensor, smoothing: float = IMPORTANCE_SMOOTHING
) -> Tensor:
    """Copy-paste importance ``S' = sum(prob * mask) / (sum(mask) + smoothing)`` (SIM_SPEC 7.8).

    The mean teacher confidence inside the instance's mask, shrunk towards 0 for tiny masks by
    the ``+ 1`` of the code. The code uses ``prob = M_I`` and ``mask = (M_I > 0.7) * box``;
    with our paper-style paste masks pass ``mask = PseudoMask.target`` (and ``prob = M_I`` or
    ``PseudoMask.blended``).

    Args:
        prob: ``(M, h, w)`` float probabilities.
        mask: ``(M, h, w)`` bool or float mask in {0, 1}, same grid.
        smoothing: added to the pixel count (1.0).

    Returns:
        ``(M,)`` float32 scores in ``[0, 1)``; 0 for an empty mask.
    """
    if prob.shape != mask.shape:
        raise ValueError(f"prob {tuple(prob.shape)} and mask {tuple(mask.shape)} must match")
    p = prob.float().flatten(1)
    m = (mask > 0).float().flatten(1)
    return (p * m).sum(dim=1) / (m.sum(dim=1) + smoothing)


@torch.no_grad()
def full_resolution_masks(
    prob: Tensor,
    threshold: Tensor | float,
    box_masks_full: Tensor,
    scale: int = 4,
) -> Tensor:
    """Upsample stride-4 probabilities to the input grid and threshold them inside the box.

    Used to build the paste masks pushed into the copy-paste memory bank. The convention is the
    code's (SIM_SPEC 7.8 "Paste masks" and 12 item 11): ``F.interpolate(x scale, bilinear,
    align_corners=False)``, then ``> threshold``, then ``* box``. Passing
    ``(PseudoMask.blended, PseudoMask.tau_high)`` gives the paper's paste mask (the pseudo
    mask M_hat at full resolution); ``(M_I, 0.7)`` gives the code's.

    Args:
        prob: ``(M, h, w)`` float probabilities on the stride-``scale`` grid.
        threshold: a float or ``(M,)`` per-instance thresholds (strict ``>``).
        box_masks_full: ``(M, H, W)`` box masks in {0, 1} of the padded input frame, with
            ``H = scale * h`` and ``W = scale * w`` (or smaller: the upsampled map is cropped).

    Returns:
        ``(M, H, W)`` bool masks.
    """
    m, h, w = prob.shape
    big_h, big_w = box_masks_full.shape[-2:]
    if box_masks_full.shape[0] != m or big_h > scale * h or big_w > scale * w:
        raise ValueError(f"box_masks_full {tuple(box_masks_full.shape)} does not fit prob "
                         f"{tuple(prob.shape)} upsampled x{scale}")
    if m == 0:
        return torch.zeros(0, big_h, big_w, dtype=torch.bool, device=prob.device)
    up = F.interpolate(prob.float()[:, None], scale_factor=scale, mode="bilinear",
                       align_corners=False)[:, 0, :big_h, :big_w]
    thr = torch.as_tensor(threshold, dtype=torch.float32, device=prob.device)
    if thr.dim() == 1:
        thr = thr[:, None, None]
    return (up > thr) & (box_masks_full > 0)
