"""FCOS target assignment, CondInst's positive sampling and mask centres on hand-made cases.

Locations of a stride-s level sit at ``s*j + s//2``; centre sampling keeps a location when it is
strictly inside ``centre +- 1.5 s`` (clipped to the box) and ``max(l, t, r, b)`` lies in the
level's range ``[-1, 64], [64, 128], [128, 256], [256, 512], [512, inf]``.
"""

from __future__ import annotations

import math

import torch

from serving.model.ops import compute_locations
from training.targets import assign_targets, mask_centers, sample_positives

STRIDES = (8, 16, 32, 64, 128)


def pyramid(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Locations (N, 2), strides (N,) and levels (N,) of P3-P7 for a size x size input."""
    locs, strides, levels = [], [], []
    for level, s in enumerate(STRIDES):
        n = math.ceil(size / s)
        loc = compute_locations(n, n, s, torch.device("cpu"))
        locs.append(loc)
        strides.append(torch.full((loc.shape[0],), float(s)))
        levels.append(torch.full((loc.shape[0],), level, dtype=torch.int64))
    return torch.cat(locs), torch.cat(strides), torch.cat(levels)


def positives(t, locations: torch.Tensor, strides: torch.Tensor) -> dict[tuple[int, int, int],
                                                                           int]:
    """{(stride, x, y): gt_index} of the positive locations."""
    idx = torch.nonzero(t.gt_index >= 0).squeeze(1).tolist()
    return {(int(strides[i]), int(locations[i, 0]), int(locations[i, 1])): int(t.gt_index[i])
            for i in idx}


def test_one_box_hand_computed() -> None:
    # Box [0, 0, 64, 64] on 128 x 128, centre (32, 32).
    # P3 (s=8): region (32 - 12, 32 + 12) = (20, 44) open -> x, y in {28, 36} (20 and 44 are
    #   locations but excluded by the strict test); max ltrb at (28, 28) = 36 <= 64 -> positive.
    # P4 (s=16): region (8, 56) -> {24, 40}; max ltrb 40 < 64 -> outside P4's [64, 128].
    # P5 (s=32): region (0, 64) -> {16, 48}; max ltrb 48 < 128. P6: {32}, 32 < 256.
    # P7 (s=128): the only location (64, 64) is on the open boundary.
    locations, strides, levels = pyramid(128)
    boxes = torch.tensor([[0.0, 0.0, 64.0, 64.0]])
    t = assign_targets(locations, strides, levels, boxes, torch.tensor([3]))
    pos = positives(t, locations, strides)
    assert pos == {(8, 28, 28): 0, (8, 36, 28): 0, (8, 28, 36): 0, (8, 36, 36): 0}
    assert t.labels.shape == (locations.shape[0],)
    assert set(t.labels[t.gt_index >= 0].tolist()) == {3}
    assert bool((t.labels[t.gt_index < 0] == -1).all())
    # Regression targets (l, t, r, b) in units of the stride.
    where = {(int(x), int(y)): i for i, (x, y) in enumerate(locations.tolist()) if strides[i] == 8}
    expected = {(28, 28): (3.5, 3.5, 4.5, 4.5), (36, 28): (4.5, 3.5, 3.5, 4.5),
                (28, 36): (3.5, 4.5, 4.5, 3.5), (36, 36): (4.5, 4.5, 3.5, 3.5)}
    for xy, ltrb in expected.items():
        assert t.reg_targets[where[xy]].tolist() == list(ltrb)


def test_level_range_moves_a_large_box_to_p4() -> None:
    # Box [0, 0, 160, 160] on 256 x 256, centre (80, 80).
    # P3: {76, 84}, max ltrb 84 > 64 -> no. P4 (s=16): region (56, 104) -> {72, 88};
    # max ltrb at (72, 72) = 88 in [64, 128] -> positive. P5 (s=32): region (32, 128) ->
    # {48, 80, 112}; max ltrb <= 112 < 128 -> no.
    locations, strides, levels = pyramid(256)
    t = assign_targets(locations, strides, levels, torch.tensor([[0.0, 0.0, 160.0, 160.0]]),
                       torch.tensor([0]))
    pos = positives(t, locations, strides)
    assert pos == {(16, 72, 72): 0, (16, 88, 72): 0, (16, 72, 88): 0, (16, 88, 88): 0}
    i = next(i for i in range(len(strides)) if strides[i] == 16
             and locations[i].tolist() == [72.0, 72.0])
    assert t.reg_targets[i].tolist() == [72 / 16, 72 / 16, 88 / 16, 88 / 16]


def test_ambiguous_locations_go_to_the_smaller_box() -> None:
    # A = [0, 0, 64, 64] (area 4096): P3 candidates {28, 36}^2.
    # B = [24, 24, 56, 56] (area 1024), centre (40, 40), region (28, 52): {36, 44}^2.
    # (36, 36) is a candidate of both -> B.
    locations, strides, levels = pyramid(128)
    a, b = [0.0, 0.0, 64.0, 64.0], [24.0, 24.0, 56.0, 56.0]
    for order in ((a, b), (b, a)):
        boxes = torch.tensor(order)
        labels = torch.tensor([2, 5]) if order[0] is a else torch.tensor([5, 2])
        ia, ib = (0, 1) if order[0] is a else (1, 0)
        t = assign_targets(locations, strides, levels, boxes, labels)
        pos = positives(t, locations, strides)
        assert pos == {(8, 28, 28): ia, (8, 36, 28): ia, (8, 28, 36): ia, (8, 36, 36): ib,
                       (8, 44, 36): ib, (8, 36, 44): ib, (8, 44, 44): ib}
        i = next(i for i in range(len(strides)) if strides[i] == 8
                 and locations[i].tolist() == [36.0, 36.0])
        assert int(t.labels[i]) == 5
        # Regression target relative to B: (36-24, 36-24, 56-36, 56-36) / 8.
        assert t.reg_targets[i].tolist() == [1.5, 1.5, 2.5, 2.5]


def test_sampling_centre_follows_the_given_centres() -> None:
    # Box [0, 0, 64, 64] with its sampling centre moved to (12, 12) (e.g. the centroid of an
    # L-shaped visible region): region (0, 24) -> x, y in {4, 12, 20}.
    locations, strides, levels = pyramid(128)
    t = assign_targets(locations, strides, levels, torch.tensor([[0.0, 0.0, 64.0, 64.0]]),
                       torch.tensor([1]), centers=torch.tensor([[12.0, 12.0]]))
    assert set(positives(t, locations, strides)) == {(8, x, y) for x in (4, 12, 20)
                                                     for y in (4, 12, 20)}


def test_no_boxes_is_all_background() -> None:
    locations, strides, levels = pyramid(128)
    t = assign_targets(locations, strides, levels, torch.zeros((0, 4)),
                       torch.zeros((0,), dtype=torch.int64))
    n = locations.shape[0]
    assert t.labels.tolist() == [-1] * n and t.gt_index.tolist() == [-1] * n
    assert t.reg_targets.shape == (n, 4) and not bool(t.reg_targets.any())
    assert sample_positives(t.gt_index, torch.rand(n)).numel() == 0


def test_sample_positives_keeps_the_best_per_box() -> None:
    gt_index = torch.tensor([-1, 0, 0, 0, 1, 1, -1, 0])
    quality = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.2, 0.8, 0.99, 0.7])
    # G = 2 boxes; topk 4 -> quota max(int(4 / 2), 1) = 2 per box, best quality first,
    # grouped by box: box 0 keeps 7 (0.7) and 2 (0.5); box 1 keeps 5 (0.8) and 4 (0.2).
    assert sample_positives(gt_index, quality, 4).tolist() == [7, 2, 5, 4]
    # topk 64 -> quota 32: every positive, background (0.9, 0.99) never.
    assert sample_positives(gt_index, quality, 64).tolist() == [7, 2, 3, 1, 5, 4]
    # topk 3 -> int(1.5) = 1; topk 1 -> max(int(0.5), 1) = 1.
    assert sample_positives(gt_index, quality, 3).tolist() == [7, 5]
    assert sample_positives(gt_index, quality, 1).tolist() == [7, 5]


def test_sample_positives_quota_uses_boxes_with_positives_only() -> None:
    # Box 1 has no positive location: G = 2 (boxes 0 and 2), quota int(4 / 2) = 2.
    gt_index = torch.tensor([0, 0, 0, 2, 2, 2])
    quality = torch.tensor([0.3, 0.2, 0.1, 0.6, 0.5, 0.4])
    assert sample_positives(gt_index, quality, 4).tolist() == [0, 1, 3, 4]


def test_mask_centers_box_and_l_shape() -> None:
    masks = torch.zeros((3, 16, 16), dtype=torch.bool)
    masks[0, 4:8, 2:10] = True  # box mask of [2, 4, 10, 8]
    # L shape: a 2 x 6 vertical bar (12 px, centroid (1, 3)) and a 4 x 2 foot
    # (8 px, centroid (4, 5)) -> ((12 * 1 + 8 * 4) / 20, (12 * 3 + 8 * 5) / 20) = (2.2, 3.8).
    masks[1, 0:6, 0:2] = True
    masks[1, 4:6, 2:6] = True
    boxes = torch.tensor([[2.0, 4.0, 10.0, 8.0], [0.0, 0.0, 6.0, 6.0], [3.0, 5.0, 9.0, 7.0]])
    centers = mask_centers(masks, boxes)
    assert torch.allclose(centers[0], torch.tensor([6.0, 6.0]))  # == box centre
    assert torch.allclose(centers[1], torch.tensor([2.2, 3.8]))
    assert centers[2].tolist() == [6.0, 6.0]  # empty mask -> box centre
