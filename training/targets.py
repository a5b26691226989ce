"""FCOS target assignment and CondInst's training-time positive sampling (SIM_SPEC 3-4).

The candidate test (centre sampling + level ranges) is
``serving.inference.assign.candidate_matrix``,
the same function box-prompted inference uses, so a prompt box is segmented with the locations
training assigns to it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from serving.inference.assign import candidate_matrix


class FCOSTargets(NamedTuple):
    """Targets of one image over its N locations.

    Attributes:
        labels: (N,) int64 class index, -1 for background.
        gt_index: (N,) int64 index of the assigned box within the image, -1 for background.
        reg_targets: (N, 4) float (l, t, r, b) in units of the location's stride.
    """

    labels: Tensor
    gt_index: Tensor
    reg_targets: Tensor


def mask_centers(masks: Tensor, boxes: Tensor) -> Tensor:
    """Centre of mass of each (M, H, W) mask (pixel centres at +0.5), box centre if empty.

    BoxInst samples centres at the centre of mass of ``gt_bitmasks_full`` (SIM_SPEC 3): for a
    box mask this is the box centre on the pixel grid; for copy-pasted or occluded instances it
    is the centroid of the visible region.
    """
    m = masks.float()
    area = m.sum(dim=(1, 2))
    ys = torch.arange(m.shape[1], device=m.device, dtype=m.dtype) + 0.5
    xs = torch.arange(m.shape[2], device=m.device, dtype=m.dtype) + 0.5
    cx = (m.sum(dim=1) * xs).sum(dim=1) / area.clamp(min=1)
    cy = (m.sum(dim=2) * ys).sum(dim=1) / area.clamp(min=1)
    centers = torch.stack((cx, cy), dim=1)
    box_centers = (boxes[:, :2] + boxes[:, 2:]) / 2
    return torch.where((area > 0)[:, None], centers, box_centers)


def assign_targets(locations: Tensor, strides: Tensor, levels: Tensor, boxes: Tensor,
                   labels: Tensor, centers: Tensor | None = None,
                   radius: float = 1.5) -> FCOSTargets:
    """FCOS assignment for one image: ambiguous locations go to the smallest box.

    Args:
        locations: (N, 2); strides: (N,); levels: (N,).
        boxes: (M, 4) XYXY input pixels; labels: (M,) int64.
        centers: (M, 2) sampling centres (default the box centres).
    """
    n = locations.shape[0]
    if boxes.shape[0] == 0:
        return FCOSTargets(
            torch.full((n,), -1, dtype=torch.int64, device=locations.device),
            torch.full((n,), -1, dtype=torch.int64, device=locations.device),
            torch.zeros((n, 4), device=locations.device),
        )
    is_cand, ltrb = candidate_matrix(locations, strides, levels, boxes, centers, radius)  # (M, N)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # (M,)
    cost = torch.where(is_cand, area[:, None].expand_as(is_cand), torch.full_like(ltrb[..., 0],
                                                                                  float("inf")))
    best_cost, best = cost.min(dim=0)  # (N,)
    positive = torch.isfinite(best_cost)
    gt_index = torch.where(positive, best, torch.full_like(best, -1))
    cls = torch.where(positive, labels[best], torch.full_like(best, -1))
    reg = ltrb[best, torch.arange(n, device=locations.device)] / strides[:, None]
    return FCOSTargets(cls, gt_index, reg)


def sample_positives(gt_index: Tensor, quality: Tensor, topk_per_image: int = 64) -> Tensor:
    """CondInst's positive sampling for the mask head (SIM_SPEC 4), for one image.

    With G boxes that have positives, each keeps at most ``max(int(topk / G), 1)`` of its
    positives, the ones with the highest ``quality`` (student ``sigmoid(max cls) *
    sigmoid(ctr)``).

    Args:
        gt_index: (N,) assigned box per location, -1 for background.
        quality: (N,) ranking score.

    Returns:
        (P,) int64 indices of the kept locations, grouped by box.
    """
    pos = torch.nonzero(gt_index >= 0).squeeze(1)
    if pos.numel() == 0:
        return pos
    gts = gt_index[pos]
    num_gts = int(torch.unique(gts).numel())
    quota = max(int(topk_per_image / num_gts), 1)
    # Sort by (gt, -quality), then keep the first ``quota`` entries of each gt.
    order = torch.argsort(quality[pos].float(), descending=True, stable=True)
    order = order[torch.argsort(gts[order], stable=True)]
    sorted_gts = gts[order]
    first = torch.searchsorted(sorted_gts, sorted_gts)  # start index of each gt's run
    rank = torch.arange(order.numel(), device=pos.device) - first
    return pos[order[rank < quota]]
