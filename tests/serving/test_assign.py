"""FCOS candidate assignment and the IoU weights of the box-prompted instance map (hand cases)."""

from __future__ import annotations

import math

import torch

from serving.inference.assign import (
    candidate_matrix,
    iou_weights,
    level_ranges,
    prompt_locations,
    weighted_instance_map,
)
from serving.model.ops import compute_locations

STRIDES = (8, 16, 32, 64, 128)


def pyramid(h: int, w: int):
    """Locations, strides and levels of P3-P7 for an (h, w) input, as CondInst lists them."""
    locs, strides, levels = [], [], []
    size = (h // 8, w // 8)
    for level, s in enumerate(STRIDES):
        if level > 0:
            size = (math.ceil(size[0] / 2), math.ceil(size[1] / 2))
        loc = compute_locations(size[0], size[1], s, torch.device("cpu"))
        locs.append(loc)
        strides.append(torch.full((len(loc),), float(s)))
        levels.append(torch.full((len(loc),), level, dtype=torch.int64))
    return torch.cat(locs), torch.cat(strides), torch.cat(levels)


def test_level_ranges_table():
    r = level_ranges(torch.arange(5))
    assert r.tolist() == [[-1, 64], [64, 128], [128, 256], [256, 512], [512, math.inf]]


def test_candidates_of_a_100px_box_are_p4_centre_locations_only():
    locs, strides, levels = pyramid(256, 256)
    box = torch.tensor([[30.0, 30.0, 180.0, 180.0]])  # 150 px, centre (105, 105)
    is_cand, ltrb = candidate_matrix(locs, strides, levels, box)
    assert is_cand.shape == (1, len(locs)) and ltrb.shape == (1, len(locs), 4)
    chosen = locs[is_cand[0]]
    # P4 centre region 105 +- 24 = (81, 129): locations 88, 104, 120 on both axes
    expected = {(x, y) for x in (88.0, 104.0, 120.0) for y in (88.0, 104.0, 120.0)}
    assert {tuple(p) for p in chosen.tolist()} == expected
    assert set(levels[is_cand[0]].tolist()) == {1}
    # every candidate's max(l, t, r, b) lies in P4's range [64, 128]
    max_reg = ltrb[0, is_cand[0]].max(dim=-1).values
    assert ((max_reg >= 64) & (max_reg <= 128)).all()
    # ltrb of the location (104, 104) is (74, 74, 76, 76)
    k = int(((locs == torch.tensor([104.0, 104.0])).all(dim=1) & (levels == 1)).nonzero())
    assert ltrb[0, k].tolist() == [74.0, 74.0, 76.0, 76.0]


def test_centre_region_is_clipped_to_the_box_and_radius_scales():
    locs = torch.tensor([[12.0, 12.0], [20.0, 12.0], [28.0, 12.0], [4.0, 12.0]])
    strides = torch.full((4,), 8.0)
    levels = torch.zeros(4, dtype=torch.int64)
    # box x in [8, 24]; centre 16; radius 12 -> (4, 28) clipped to (8, 24)
    box = torch.tensor([[8.0, 0.0, 24.0, 24.0]])
    is_cand, _ = candidate_matrix(locs, strides, levels, box)
    assert is_cand[0].tolist() == [True, True, False, False]
    # radius 0.5 -> (12, 20) open interval: neither 12 nor 20 qualifies
    is_cand, _ = candidate_matrix(locs, strides, levels, box, radius=0.5)
    assert is_cand[0].tolist() == [False, False, False, False]
    # an explicit sampling centre moves the region
    is_cand, _ = candidate_matrix(locs, strides, levels, box, centers=torch.tensor([[20.0, 12.0]]),
                                  radius=0.75)
    assert is_cand[0].tolist() == [False, True, False, False]


def test_prompt_locations_returns_the_candidates_nearest_first():
    locs, strides, levels = pyramid(256, 256)
    boxes = torch.tensor([[[30.0, 30.0, 180.0, 180.0]]])
    index, valid = prompt_locations(locs, strides, levels, boxes, topk=16)
    assert index.shape == valid.shape == (1, 1, 16)
    assert int(valid.sum()) == 9
    is_cand, _ = candidate_matrix(locs, strides, levels, boxes[0])
    assert set(index[0, 0, valid[0, 0]].tolist()) == set(is_cand[0].nonzero()[:, 0].tolist())
    assert valid[0, 0, :9].all()  # valid ones come first
    # nearest to the centre (105, 105) first: (104, 104) at P4
    assert locs[index[0, 0, 0]].tolist() == [104.0, 104.0]
    d = (locs[index[0, 0, :9]] - 105.0).norm(dim=-1)
    assert torch.all(d[1:] >= d[:-1])


def test_prompt_locations_fallback_for_a_tiny_box():
    locs, strides, levels = pyramid(256, 256)
    # 1.5 px box between P3 locations 100 and 108: no location lies strictly inside
    boxes = torch.tensor([[[100.5, 100.5, 102.0, 102.0], [30.0, 30.0, 180.0, 180.0]]])
    is_cand, _ = candidate_matrix(locs, strides, levels, boxes[0])
    assert not is_cand[0].any()
    index, valid = prompt_locations(locs, strides, levels, boxes, topk=16)
    assert int(valid[0, 0].sum()) == 1 and bool(valid[0, 0, 0])
    k = index[0, 0, 0]
    assert int(levels[k]) == 0 and locs[k].tolist() == [100.0, 100.0]
    assert int(valid[0, 1].sum()) == 9  # the other box is unaffected


def test_prompt_locations_topk_smaller_than_candidates():
    locs, strides, levels = pyramid(256, 256)
    boxes = torch.tensor([[[30.0, 30.0, 180.0, 180.0]]])
    index, valid = prompt_locations(locs, strides, levels, boxes, topk=4)
    assert index.shape == (1, 1, 4) and valid.all()


def test_iou_weights_normalised_zero_on_invalid_and_monotone():
    ref = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    pred = torch.tensor([[[0.0, 0.0, 10.0, 10.0],    # IoU 1
                          [0.0, 0.0, 10.0, 5.0],     # IoU 0.5
                          [0.0, 0.0, 5.0, 5.0],      # IoU 0.25
                          [0.0, 0.0, 10.0, 10.0]]])  # invalid
    valid = torch.tensor([[True, True, True, False]])
    w = iou_weights(pred, ref, valid, mu=5.0)
    assert w.shape == (1, 4)
    torch.testing.assert_close(w.sum(dim=-1), torch.ones(1))
    assert w[0, 3] == 0
    assert w[0, 0] > w[0, 1] > w[0, 2] > 0
    e = torch.exp(5.0 * torch.tensor([1.0, 0.5, 0.25]))
    torch.testing.assert_close(w[0, :3], e / e.sum())
    # mu = 0 gives the plain mean over valid entries
    w0 = iou_weights(pred, ref, valid, mu=0.0)
    torch.testing.assert_close(w0[0], torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0]))
    # no valid entries: all zeros, never NaN
    wz = iou_weights(pred, ref, torch.zeros_like(valid), mu=5.0)
    assert torch.equal(wz, torch.zeros_like(wz))


def test_weighted_instance_map():
    probs = torch.stack([torch.full((2, 3), 1.0), torch.full((2, 3), 0.0),
                         torch.full((2, 3), 0.5)])[None]  # (1, K=3, 2, 3)
    weights = torch.tensor([[0.5, 0.25, 0.25]])
    out = weighted_instance_map(probs, weights)
    assert out.shape == (1, 2, 3)
    torch.testing.assert_close(out, torch.full((1, 2, 3), 0.625))
