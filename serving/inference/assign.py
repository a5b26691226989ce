"""Which FCOS locations belong to a box, and the IoU weights of the paper's instance map M_I.

These functions are shared by training (FCOS target assignment, SIM self-correction) and by
inference (box-prompted segmentation, auto-labelling), so a prompt box is segmented with exactly
the locations training would have assigned to it (DESIGN.md section 3).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..model.ops import box_iou_pairwise
from ..model_config import SIZES_OF_INTEREST


def level_ranges(levels: Tensor, sizes_of_interest: tuple[int, ...] = SIZES_OF_INTEREST) -> Tensor:
    """(N,) level index -> (N, 2) [low, high] range on max(l, t, r, b) in pixels.

    Level ranges are ``[-1, 64], [64, 128], [128, 256], [256, 512], [512, inf]`` (SIM_SPEC 3).
    """
    bounds = [-1.0, *[float(s) for s in sizes_of_interest], float("inf")]
    table = torch.tensor([[bounds[i], bounds[i + 1]] for i in range(len(bounds) - 1)],
                         device=levels.device)
    return table[levels]


def candidate_matrix(locations: Tensor, strides: Tensor, levels: Tensor, boxes: Tensor,
                     centers: Tensor | None = None, radius: float = 1.5) -> tuple[Tensor, Tensor]:
    """FCOS positives of each box before ambiguity resolution (centre sampling + level range).

    A location is a candidate of box m when it lies inside the centre region
    ``center +- radius * stride`` clipped to the box, and ``max(l, t, r, b)`` of the location
    with respect to the box falls into its level's range (SIM_SPEC section 3).

    Args:
        locations: (N, 2) (x, y) pixels; strides: (N,) float; levels: (N,) int64.
        boxes: (..., M, 4) XYXY pixels.
        centers: (..., M, 2) sampling centres; default the box centres. BoxInst uses the centre
            of mass of the box (or pseudo) mask here.
        radius: centre-sampling radius in strides.

    Returns:
        is_candidate (..., M, N) bool and ltrb (..., M, N, 4) distances in pixels.
    """
    if centers is None:
        centers = (boxes[..., :2] + boxes[..., 2:]) / 2
    x = locations[:, 0]
    y = locations[:, 1]
    b = boxes[..., None, :]  # (..., M, 1, 4)
    ltrb = torch.stack((x - b[..., 0], y - b[..., 1], b[..., 2] - x, b[..., 3] - y), dim=-1)
    r = strides * radius  # (N,)
    c = centers[..., None, :]  # (..., M, 1, 2)
    x0 = torch.maximum(c[..., 0] - r, b[..., 0])
    y0 = torch.maximum(c[..., 1] - r, b[..., 1])
    x1 = torch.minimum(c[..., 0] + r, b[..., 2])
    y1 = torch.minimum(c[..., 1] + r, b[..., 3])
    in_center = (x > x0) & (x < x1) & (y > y0) & (y < y1)
    max_reg = ltrb.max(dim=-1).values
    ranges = level_ranges(levels)
    in_level = (max_reg >= ranges[:, 0]) & (max_reg <= ranges[:, 1])
    return in_center & in_level, ltrb


def prompt_locations(locations: Tensor, strides: Tensor, levels: Tensor, boxes: Tensor,
                     topk: int = 16, radius: float = 1.5) -> tuple[Tensor, Tensor]:
    """Up to ``topk`` locations per prompt box: its FCOS candidates, nearest the centre first.

    A box too small to hold any candidate falls back to the single location nearest its centre
    (preferring finer levels). Fixed output shapes, no data-dependent control flow (exports).

    Args:
        boxes: (B, M, 4) prompt boxes XYXY in input pixels.

    Returns:
        index (B, M, K) int64 into the N locations and valid (B, M, K) bool, K = min(topk, N).
    """
    is_cand, _ = candidate_matrix(locations, strides, levels, boxes, radius=radius)
    centers = (boxes[..., :2] + boxes[..., 2:]) / 2  # (B, M, 2)
    dist = (locations[None, None] - centers[..., None, :]).norm(dim=-1)  # (B, M, N)
    # Candidates first (ordered by distance); then every other location by distance, with a
    # small per-level penalty so the fallback prefers the finest level.
    score = is_cand.to(dist.dtype) * 1e7 - dist - levels.to(dist.dtype) * 1e-3
    k = min(topk, locations.shape[0])
    top_score, index = score.topk(k, dim=-1)
    valid = top_score > 1e6
    first = torch.zeros_like(valid)
    first[..., 0] = True
    return index, valid | first


def iou_weights(pred_boxes: Tensor, ref_boxes: Tensor, valid: Tensor, mu: float) -> Tensor:
    """Normalised weights ``exp(mu * IoU(pred_k, ref)) / sum_k`` over the K locations of each box.

    The paper's M_I (Eq. 6) weights each positive location's mask by how well its predicted box
    matches the box. Args: pred_boxes (..., K, 4), ref_boxes (..., 4), valid (..., K) bool.
    Returns (..., K) weights that sum to 1 over valid entries and are 0 elsewhere.
    """
    iou = box_iou_pairwise(pred_boxes, ref_boxes[..., None, :])
    logits = (mu * iou).masked_fill(~valid, float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(weights, nan=0.0)


def weighted_instance_map(mask_probs: Tensor, weights: Tensor) -> Tensor:
    """M_I = sum_k weights_k * mask_probs_k: (..., K, h, w) and (..., K) -> (..., h, w)."""
    return (mask_probs * weights[..., None, None]).sum(dim=-3)
