"""The score of box-prompted masks (serving/inference/quality.py): its terms against
hand-computed values, and a clean mask outranking a noisy one of the same object."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serving.inference import quality, refine
from serving.inference.box_scale import Crop, CropResult


def test_colour_separation_hand_computed():
    pixels = np.zeros((2, 3, 3), np.uint8)
    pixels[0, :2] = 10  # inside: two pixels (10, 10, 10); outside: (0,0,0) x3 and (30,0,0)
    pixels[1, 2] = (30, 0, 0)
    mask = np.zeros((2, 3), bool)
    mask[0, :2] = True
    gap = 0.0 + (10 - 7.5) ** 2 + 10 ** 2 + 10 ** 2  # means (10,10,10) vs (7.5, 0, 0)
    spread = 0.0 + 30 ** 2 * 0.75 * 4 / 3 / 4  # outside red: var of [0, 0, 0, 30], ddof 1
    assert quality.colour_separation(pixels, mask) == pytest.approx(gap / (spread + 1))
    assert quality.colour_separation(pixels, np.zeros((2, 3), bool)) == 0.0


def test_colour_separation_equals_the_per_side_statistics_on_random_regions():
    """The sums form gives the Fisher ratio computed from each side's own pixels."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        h, w = rng.integers(2, 40, 2)
        pixels = rng.integers(0, 256, (h, w, 3)).astype(np.float32)
        mask = rng.random((h, w)) < rng.random()
        inside, outside = pixels[mask].astype(np.float64), pixels[~mask].astype(np.float64)
        if len(inside) < 2 or len(outside) < 2:
            assert quality.colour_separation(pixels, mask) == 0.0
            continue
        gap = ((inside.mean(0) - outside.mean(0)) ** 2).sum()
        spread = inside.var(0, ddof=1).sum() + outside.var(0, ddof=1).sum()
        assert quality.colour_separation(pixels, mask) == pytest.approx(gap / (spread + 1),
                                                                        rel=1e-9)


def test_projection_coverage_hand_computed():
    probs = torch.tensor([[0.9, 0.2, 0.0], [0.1, 0.4, 0.0]])
    inside = np.array([[True, True, False], [True, True, False]])
    rows = (0.9 + 0.4) / 2
    cols = (0.9 + 0.4) / 2
    assert quality.projection_coverage(probs, inside) == pytest.approx((rows + cols) / 2)
    assert quality.projection_coverage(probs, np.zeros((2, 3), bool)) == 0.0


def test_colour_distance_hand_computed():
    # codes: mask {0, 0, 1}, rest {1, 2, 2, 2, 5}: shares (2/3, 1/3, 0, 0) vs (0, 1/5, 3/5, 1/5)
    codes = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 5]])
    mask = np.array([[True, True, True, False], [False, False, False, False]])
    want = (2 / 3 + (1 / 3 - 1 / 5) + 3 / 5 + 1 / 5) / 2
    assert quality.colour_distance(codes, mask) == pytest.approx(want)
    assert quality.colour_distance(codes, np.zeros((2, 4), bool)) == 0.0
    assert quality.colour_distance(torch.zeros((2, 4), dtype=torch.int64), mask) == 0.0


def _score(image: np.ndarray, probs: torch.Tensor, box: np.ndarray) -> float:
    """The quality score of one whole-image candidate with box score 0.8."""
    h, w = image.shape[:2]
    crop = Crop(0, 1.0, (0, 0, w, h), (h, w), box)
    result = CropResult(probs, 0.8, 0)
    source = refine.Source(probs, crop.window, crop.resized)
    view = refine.box_view(image, [source], box, refine=False)
    return quality.quality_score([(crop, result)], view, 0.5)


def test_a_clean_mask_outranks_a_noisy_one():
    rng = np.random.default_rng(0)
    size = 64
    ys, xs = np.mgrid[:size, :size] + 0.5
    obj = (ys - 32) ** 2 + (xs - 32) ** 2 < 14 ** 2
    image = np.where(obj[..., None], [200, 60, 60], [50, 80, 180]).astype(np.uint8)
    box = np.array([18, 18, 46, 46], np.float32)
    cells = obj[2::4, 2::4].astype(np.float32)  # the object at stride 4
    clean = torch.from_numpy(np.where(cells > 0, 0.95, 0.05).astype(np.float32))
    noisy = torch.from_numpy(np.clip(cells * 0.6 + 0.2 + rng.normal(0, 0.25, cells.shape),
                                     0, 1).astype(np.float32))
    ring = torch.from_numpy(np.where(cells > 0, 0.05, 0.95).astype(np.float32))
    ring[:4], ring[12:], ring[:, :4], ring[:, 12:] = 0.05, 0.05, 0.05, 0.05  # the box minus
    scores = [_score(image, p, box) for p in (clean, noisy, ring)]  # the object: background
    # the clean mask's soft rim (stride-4 cells upsampled) lowers its confidence and coverage
    assert scores[0] > 0.25 and scores[0] > 1.2 * scores[1] and scores[0] > 2 * scores[2]
    assert all(0 < s <= 1 for s in scores)
