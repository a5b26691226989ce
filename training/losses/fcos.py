"""FCOS detection losses for already-assigned targets (SIM_SPEC section 3).

Target assignment (level ranges, centre sampling, min-area tie break) happens elsewhere;
these functions take one flat row per location of the whole batch (all FPN levels
concatenated) and return the three FCOS loss terms. Losses are computed in float32 even
inside an autocast region.

Choices:

- Classification uses ``torchvision.ops.sigmoid_focal_loss`` (the same alpha/gamma formula
  as upstream ``sigmoid_focal_loss_jit``).
- The GIoU is written here instead of using ``torchvision.ops.generalized_box_iou_loss``
  because upstream FCOS (``IOULoss`` / ``compute_ious``) smooths the IoU as
  ``(I + 1) / (U + 1)`` on stride-normalised ltrb, where boxes are only a few units wide, so
  the +1 changes the loss noticeably; torchvision uses ``I / (U + eps)``. With
  ``iou_smooth=0`` :func:`giou_loss_ltrb` equals torchvision's loss (checked in the tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss

from training.losses.boxinst import zero_with_grad

__all__ = ["centerness_target", "fcos_losses", "giou_loss_ltrb"]

# Focal loss parameters (SIM_SPEC 3: alpha 0.25, gamma 2).
FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
# IoU smoothing of upstream compute_ious (SIM_SPEC 3: "+1 smoothing").
IOU_SMOOTH = 1.0
# Lower bounds of the normalisers (SIM_SPEC 12, item 13: num_pos_avg >= 1, loss_denorm >= 1e-6).
_MIN_NUM_POS = 1.0
_MIN_CTR_SUM = 1e-6


def centerness_target(reg_targets: Tensor) -> Tensor:
    """Centerness ``sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b))`` (SIM_SPEC 3).

    Args:
        reg_targets: ``(P, 4)`` positive ltrb distances (any unit; the ratio is scale-free).

    Returns:
        ``(P,)`` float32 in ``[0, 1]``. A zero-size side (max 0) gives 0 instead of NaN.
    """
    t = reg_targets.float()
    left_right = t[:, [0, 2]]
    top_bottom = t[:, [1, 3]]
    ratio_lr = left_right.amin(dim=1) / left_right.amax(dim=1).clamp(min=1e-12)
    ratio_tb = top_bottom.amin(dim=1) / top_bottom.amax(dim=1).clamp(min=1e-12)
    return torch.sqrt((ratio_lr * ratio_tb).clamp(min=0.0))


def giou_loss_ltrb(pred: Tensor, target: Tensor, iou_smooth: float = IOU_SMOOTH) -> Tensor:
    """Per-row ``1 - GIoU`` of two ltrb boxes around the same location.

    Both boxes are ``(-l, -t, r, b)`` around a common centre, so intersection and enclosing
    widths are sums of per-side minima / maxima. ``IoU = (I + s) / (U + s)`` with
    ``s = iou_smooth`` (upstream FCOS uses 1), ``GIoU = IoU - (C - U) / C``.

    Args:
        pred: ``(P, 4)`` predicted ltrb distances (non-negative, stride units).
        target: ``(P, 4)`` target ltrb distances (positive, stride units).
        iou_smooth: additive IoU smoothing ``s``.

    Returns:
        ``(P,)`` float32 loss, 0 for a perfect prediction.
    """
    p = pred.float()
    t = target.float()
    pred_area = (p[:, 0] + p[:, 2]) * (p[:, 1] + p[:, 3])
    target_area = (t[:, 0] + t[:, 2]) * (t[:, 1] + t[:, 3])
    w_inter = torch.minimum(p[:, 0], t[:, 0]) + torch.minimum(p[:, 2], t[:, 2])
    h_inter = torch.minimum(p[:, 1], t[:, 1]) + torch.minimum(p[:, 3], t[:, 3])
    w_enclose = torch.maximum(p[:, 0], t[:, 0]) + torch.maximum(p[:, 2], t[:, 2])
    h_enclose = torch.maximum(p[:, 1], t[:, 1]) + torch.maximum(p[:, 3], t[:, 3])
    inter = w_inter.clamp(min=0.0) * h_inter.clamp(min=0.0)
    union = pred_area + target_area - inter
    enclose = (w_enclose * h_enclose).clamp(min=1e-7)  # guards a degenerate 0-size pair
    iou = (inter + iou_smooth) / (union + iou_smooth).clamp(min=1e-7)
    giou = iou - (enclose - union) / enclose
    return 1.0 - giou


def fcos_losses(
    cls_logits: Tensor,
    box_reg: Tensor,
    ctrness: Tensor,
    labels: Tensor,
    reg_targets: Tensor,
    num_pos_avg: float,
    ctr_sum_avg: float | None = None,
) -> dict[str, Tensor]:
    """FCOS classification, box and centerness losses (SIM_SPEC 3, ``fcos_losses``).

    Args:
        cls_logits: ``(P, C)`` class logits of all locations of the batch, flattened.
        box_reg: ``(P, 4)`` predicted ltrb distances in stride units.
        ctrness: ``(P,)`` centerness logits.
        labels: ``(P,)`` int64 class index ``0..C-1`` for positives, ``-1`` for background.
        reg_targets: ``(P, 4)`` ltrb targets in stride units (only positive rows are read).
        num_pos_avg: number of positives averaged over processes, clamped here at >= 1;
            divides the focal and centerness sums.
        ctr_sum_avg: sum of the positives' centerness targets averaged over processes;
            divides the GIoU sum (clamped at >= 1e-6). ``None``: the local sum is used.

    Returns:
        ``{"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"}`` float32 scalars; with no
        positives the loc and ctr terms are 0 and still connected to the graph.
    """
    num_classes = cls_logits.shape[1]
    norm = max(float(num_pos_avg), _MIN_NUM_POS)
    pos = labels >= 0
    # One-hot class targets; background rows (label -1) stay all zero.
    class_target = F.one_hot(labels.clamp(min=0), num_classes).to(torch.float32)
    class_target = class_target * pos[:, None].to(torch.float32)
    loss_cls = (
        sigmoid_focal_loss(
            cls_logits.float(),
            class_target,
            alpha=FOCAL_ALPHA,
            gamma=FOCAL_GAMMA,
            reduction="sum",
        )
        / norm
    )

    pos_idx = torch.nonzero(pos, as_tuple=True)[0]
    ctr_targets = centerness_target(reg_targets[pos_idx])
    if ctr_sum_avg is None:
        ctr_sum = ctr_targets.sum()
    else:
        ctr_sum = torch.as_tensor(float(ctr_sum_avg), device=ctr_targets.device)
    ctr_denom = ctr_sum.clamp(min=_MIN_CTR_SUM)
    if pos_idx.numel() > 0:
        loss_loc = (giou_loss_ltrb(box_reg[pos_idx], reg_targets[pos_idx]) * ctr_targets).sum()
        loss_loc = loss_loc / ctr_denom
        loss_ctr = (
            F.binary_cross_entropy_with_logits(
                ctrness[pos_idx].float(), ctr_targets, reduction="sum"
            )
            / norm
        )
    else:
        loss_loc = zero_with_grad(box_reg)
        loss_ctr = zero_with_grad(ctrness)
    return {"loss_fcos_cls": loss_cls, "loss_fcos_loc": loss_loc, "loss_fcos_ctr": loss_ctr}
