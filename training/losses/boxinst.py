"""BoxInst mask losses: box rasterisation, projection loss and pairwise loss (SIM_SPEC 6).

Pure tensor functions, vectorised over instances and pixels, device-agnostic. Losses are
computed in float32 even inside an autocast region (the logits are cast up first), so
``logsigmoid`` / log-sum-exp stay accurate under bf16/fp16 training.

Shapes: ``N`` instances (positive locations after sampling), ``h, w`` the stride-4
mask-logit grid (``H / 4, W / 4`` of the padded input, SIM_SPEC section 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from training.losses.color import unfold_wo_center

__all__ = [
    "boxes_to_bitmasks",
    "dice_coefficient",
    "feature_similarity",
    "pairwise_loss",
    "pairwise_warmup",
    "projection_loss",
    "zero_with_grad",
]

# Dice denominator epsilon (SIM_SPEC 6.3 and section 12, item 13).
DICE_EPS = 1e-5
# Feature similarity exp(-||f_i - f_j|| * 1) of the SIM code's get_feat_similarity (SIM_SPEC 6.4).
_FEAT_SIM_SCALE = 1.0


def zero_with_grad(t: Tensor) -> Tensor:
    """A float32 scalar 0 connected to the graph of ``t`` (loss of an empty input)."""
    return t.float().sum() * 0.0 + 0.0  # + 0.0: never -0.0 (a negative sum logs "-0.000")


def boxes_to_bitmasks(
    boxes: Tensor, height: int, width: int, stride: int = 4
) -> tuple[Tensor, Tensor]:
    """Rasterise XYXY boxes into full-resolution and stride-sampled box masks (SIM_SPEC 6.1).

    The rule is upstream's ``full[int(y1):int(y2 + 1), int(x1):int(x2 + 1)] = 1``: the start
    is truncated, the end ``x2 + 1`` is truncated and exclusive, so pixel column ``c`` is
    inside iff ``trunc(x1) <= c < trunc(x2 + 1)`` (SIM_SPEC 12, item 15). Implemented with
    coordinate comparisons instead of a Python loop over boxes. Coordinates are expected to
    be clipped to the frame; a start below 0 is treated as 0 (Python's negative-slice wrap
    is not reproduced) and ends past the frame are cut.

    Args:
        boxes: ``(M, 4)`` float XYXY in absolute pixels of the padded input frame.
        height: padded input height ``H``.
        width: padded input width ``W``.
        stride: mask stride (4); the strided mask samples ``[stride//2::stride]``.

    Returns:
        ``(full, strided)``: float32 ``(M, H, W)`` and ``(M, ceil((H - stride//2) / stride),
        ceil((W - stride//2) / stride))`` (``(M, H/4, W/4)`` for H, W multiples of 4), values
        in {0, 1}, on the device of ``boxes``.
    """
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (M, 4), got {tuple(boxes.shape)}")
    b = boxes.to(torch.float32)
    x0 = torch.trunc(b[:, 0])[:, None]
    y0 = torch.trunc(b[:, 1])[:, None]
    x_end = torch.trunc(b[:, 2] + 1.0)[:, None]
    y_end = torch.trunc(b[:, 3] + 1.0)[:, None]
    ys = torch.arange(height, device=boxes.device, dtype=torch.float32)[None, :]
    xs = torch.arange(width, device=boxes.device, dtype=torch.float32)[None, :]
    rows = (ys >= y0) & (ys < y_end)  # (M, H)
    cols = (xs >= x0) & (xs < x_end)  # (M, W)
    full = (rows[:, :, None] & cols[:, None, :]).to(torch.float32)
    start = stride // 2
    return full, full[:, start::stride, start::stride]


def dice_coefficient(x: Tensor, target: Tensor, eps: float = DICE_EPS) -> Tensor:
    """Per-sample dice loss ``1 - 2 sum(x t) / (sum(x^2) + sum(t^2) + eps)`` (SIM_SPEC 6.3).

    Args:
        x: ``(N, ...)`` predictions (probabilities).
        target: same shape as ``x``, targets in ``[0, 1]``.
        eps: denominator epsilon (1e-5 upstream).

    Returns:
        ``(N,)`` loss per sample, summed over every dimension except the first.
    """
    n = x.shape[0]
    x = x.reshape(n, -1)
    target = target.reshape(n, -1).to(x.dtype)
    intersection = (x * target).sum(dim=1)
    union = (x * x).sum(dim=1) + (target * target).sum(dim=1) + eps
    return 1.0 - 2.0 * intersection / union


def projection_loss(mask_logits: Tensor, box_masks: Tensor) -> Tensor:
    """BoxInst projection loss (SIM_SPEC 6.3).

    ``mean_n [Dice(max_y p, max_y b) + Dice(max_x p, max_x b)]`` with ``p = sigmoid(logits)``;
    the two axis terms are summed, not averaged.

    Args:
        mask_logits: ``(N, 1, h, w)`` mask logits at stride 4.
        box_masks: ``(N, h, w)`` float {0, 1} box masks at stride 4 (``gt_bitmasks[gt_inds]``).

    Returns:
        float32 scalar; 0 connected to the graph when ``N == 0``.
    """
    if mask_logits.shape[0] == 0:
        return zero_with_grad(mask_logits)
    probs = mask_logits.float().sigmoid()
    boxes = box_masks.float().unsqueeze(1)
    loss_y = dice_coefficient(probs.amax(dim=2), boxes.amax(dim=2))  # projection onto x
    loss_x = dice_coefficient(probs.amax(dim=3), boxes.amax(dim=3))  # projection onto y
    return (loss_x + loss_y).mean()


def pairwise_loss(
    mask_logits: Tensor,
    color_sim: Tensor,
    box_masks: Tensor,
    threshold: float,
    kernel: int = 3,
    dilation: int = 2,
) -> Tensor:
    """BoxInst pairwise affinity loss, in log space (SIM_SPEC 6.4).

    For each pixel ``i`` and neighbour ``j`` (order of :func:`unfold_wo_center`),
    ``-log P_same = -logaddexp(ls(z_i) + ls(z_j), ls(-z_i) + ls(-z_j))`` with
    ``ls = logsigmoid``. Edges are weighted by ``w = [S >= threshold] * box_mask(i)`` (the
    neighbour may lie outside the box) and the loss is ``sum(loss * w) / max(sum(w), 1)``.
    The warm-up factor (:func:`pairwise_warmup`) is applied by the caller.

    Args:
        mask_logits: ``(N, 1, h, w)`` mask logits at stride 4.
        color_sim: ``(N, K, h, w)`` similarity ``S`` (colour, or colour times feature in the
            SIM code), ``K = kernel * kernel - 1``; no gradient is taken through it.
        box_masks: ``(N, h, w)`` float {0, 1} box masks at stride 4.
        threshold: edge threshold (0.3 upstream BoxInst, 0.1 in the SIM code).
        kernel: neighbourhood size (3), must match ``color_sim``.
        dilation: neighbour spacing (2), must match ``color_sim``.

    Returns:
        float32 scalar; 0 connected to the graph when ``N == 0`` or no edge has weight.
    """
    if mask_logits.shape[0] == 0:
        return zero_with_grad(mask_logits)
    z = mask_logits.float()
    log_fg = F.logsigmoid(z)  # (N, 1, h, w)
    log_bg = F.logsigmoid(-z)
    log_fg_nb = unfold_wo_center(log_fg, kernel, dilation)[:, 0]  # (N, K, h, w)
    log_bg_nb = unfold_wo_center(log_bg, kernel, dilation)[:, 0]
    # log P_same = log(p_i p_j + (1 - p_i)(1 - p_j)); logaddexp is the stable LSE.
    log_same = torch.logaddexp(log_fg + log_fg_nb, log_bg + log_bg_nb)
    loss = -log_same
    weights = (color_sim.detach().float() >= threshold).float() * box_masks.float()[:, None]
    # Normaliser clamped at 1 (SIM_SPEC 12, item 13).
    return (loss * weights).sum() / weights.sum().clamp(min=1.0)


def pairwise_warmup(step: int, warmup_steps: int) -> float:
    """Linear warm-up factor ``min(step / warmup_steps, 1)`` of the pairwise loss (SIM_SPEC 6.4).

    Args:
        step: current training iteration (0-based count of finished iterations).
        warmup_steps: warm-up length (10000 of 90000 in the paper's 1x schedule, scaled with
            the schedule per "Our decisions"). ``<= 0`` disables the warm-up.

    Returns:
        Factor in ``[0, 1]``.
    """
    if warmup_steps <= 0:
        return 1.0
    return float(min(max(step, 0) / warmup_steps, 1.0))


def feature_similarity(feats: Tensor, kernel: int = 3, dilation: int = 2) -> Tensor:
    """Feature similarity ``S_feat(i, j) = exp(-||f_i - f_j||_2)`` (SIM code, SIM_SPEC 6.4).

    Args:
        feats: ``(N, D, h, w)`` features (the unnormalised EMA mask features upsampled to
            stride 4 by the caller); treated as constants (no gradient).
        kernel: neighbourhood size (3).
        dilation: neighbour spacing (2).

    Returns:
        ``(N, kernel * kernel - 1, h, w)`` float32 in ``(0, 1]``. Neighbours outside the map
        compare against zero padding; the colour similarity it is multiplied with is already
        0 there.
    """
    with torch.no_grad():
        f = feats.detach().float()
        neighbours = unfold_wo_center(f, kernel, dilation)  # (N, D, K, h, w)
        distance = torch.linalg.vector_norm(f[:, :, None] - neighbours, dim=1)
        return torch.exp(-distance * _FEAT_SIM_SCALE)
