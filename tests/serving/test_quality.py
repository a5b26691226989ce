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


def test_boundary_sharpness_hand_computed():
    ramp = torch.tensor([[0.0, 0.25, 0.5, 0.75, 1.0]] * 3)
    mask = ramp.numpy() > 0.5  # the last two columns, all of them boundary cells
    assert quality.boundary_sharpness(ramp, mask) == pytest.approx(2 * 0.25)
    # cells half an input pixel wide: twice the gradient per input pixel
    assert quality.boundary_sharpness(ramp, mask, (1.0, 0.5)) == pytest.approx(1.0)
    square = torch.zeros((5, 5))
    square[1:4, 1:4] = 1.0  # a step: its 8 rim cells change by 1/2 per cell along each axis
    assert quality.boundary_sharpness(square, square.numpy() > 0.5) == 1.0  # clipped
    assert quality.boundary_sharpness(square, np.zeros((5, 5), bool)) == 0.0


def test_boundary_sharpness_is_the_mean_gradient_over_the_boundary():
    """Against numpy's gradient of the whole map (central differences, one-sided at the
    region's border), on random maps, masks and spacings, 1-pixel-wide ones included."""
    rng = np.random.default_rng(0)
    for h, w in [(1, 9), (9, 1), (2, 2), (17, 23)]:
        probs = rng.random((h, w)).astype(np.float32)
        mask = probs > 0.4
        spacing = (0.5 + rng.random(), 0.5 + rng.random())
        squared = sum(np.gradient(probs.astype(np.float64), spacing[a], axis=a) ** 2
                      for a in (0, 1) if probs.shape[a] > 1)
        padded = np.pad(mask, 1)
        inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        expected = min(1.0, 2 * np.sqrt(squared[mask & ~inner]).mean())
        got = quality.boundary_sharpness(torch.from_numpy(probs), mask, spacing)
        assert got == pytest.approx(expected, rel=1e-12)


def _disc(cells: int, pixels_per_cell: float) -> torch.Tensor:
    """A disc of radius 20 original px whose probability ramps from 1 to 0 over 8 px,
    sampled on a ``cells`` x ``cells`` grid of ``pixels_per_cell`` px cells over a 64 px
    square."""
    centres = (np.arange(cells) + 0.5) * pixels_per_cell
    r = np.hypot(*np.meshgrid(centres - 32, centres - 32, indexing="ij"))
    return torch.from_numpy(np.clip((20 - r) / 8 + 0.5, 0, 1).astype(np.float32))


def test_boundary_sharpness_reads_the_same_on_an_upscaled_region():
    """Per input pixel: the same object seen at the same input size, its probabilities at
    each original pixel (input scale 1/2: half an input pixel per cell) or on a grid of two
    pixels per cell (one input pixel per cell), is as sharp: a ramp over 8 px, 4 input px."""
    fine, coarse = _disc(64, 1.0), _disc(32, 2.0)
    at_fine = quality.boundary_sharpness(fine, fine.numpy() > 0.5, (0.5, 0.5))
    at_coarse = quality.boundary_sharpness(coarse, coarse.numpy() > 0.5, (1.0, 1.0))
    assert at_fine == pytest.approx(0.5, rel=0.1) and at_coarse == pytest.approx(0.5, rel=0.1)


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
    # the clean mask's soft rim (stride-4 cells upsampled, unrefined) lowers its confidence,
    # coverage and boundary sharpness (a ramp over ~4 input px: ~0.5, squared)
    assert scores[0] > 0.04 and scores[0] > 1.2 * scores[1] and scores[0] > 2 * scores[2]
    assert all(0 < s <= 1 for s in scores)


def test_crowding_hand_computed():
    boxes = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [100, 100, 110, 110], [100, 100, 110, 110],
                      [50, 50, 60, 60]], np.float32)
    # the first two overlap by 5 x 10 of a 15 x 10 union; the next two are the same box
    np.testing.assert_allclose(quality.crowding(boxes), [1 / 3, 1 / 3, 1, 1, 0])
    assert quality.crowding(boxes[:1]).tolist() == [0.0]  # a box alone
    assert quality.crowding(np.zeros((0, 4), np.float32)).shape == (0,)
    # boxes of no area: no IoU (not 0 / 0)
    assert quality.crowding(np.array([[3, 3, 3, 3], [3, 3, 3, 3]], np.float32)).tolist() == [0, 0]


def test_crowding_in_row_chunks_equals_the_whole_matrix(monkeypatch):
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 200, (50, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 60, (50, 2))], 1)
    # boxes given twice (in other groups of 7 after sorting), one across the whole image
    boxes = np.concatenate([boxes, boxes[[3, 20, 41]], [[0, 0, 300, 300]]])
    ious = np.array([[_iou(a, b) if i != j else 0.0 for j, b in enumerate(boxes)]
                     for i, a in enumerate(boxes)])
    monkeypatch.setattr(quality, "CROWDING_ROWS", 7)  # rows in 8 groups, the last short
    np.testing.assert_allclose(quality.crowding(boxes), ious.max(1), rtol=1e-12)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union


def test_a_crowded_box_scores_lower_by_the_crowding_power():
    size = 64
    ys, xs = np.mgrid[:size, :size] + 0.5
    obj = (ys - 32) ** 2 + (xs - 32) ** 2 < 14 ** 2
    image = np.where(obj[..., None], [200, 60, 60], [50, 80, 180]).astype(np.uint8)
    box = np.array([18, 18, 46, 46], np.float32)
    probs = torch.from_numpy(np.where(obj[2::4, 2::4], 0.95, 0.05).astype(np.float32))
    crop = Crop(0, 1.0, (0, 0, size, size), (size, size), box)
    pairs = [(crop, CropResult(probs, 0.8, 0))]
    view = refine.box_view(image, [refine.Source(probs, crop.window, crop.resized)], box)
    alone = quality.quality_score(pairs, view, 0.5)
    assert alone > 100 * quality.MIN_SCORE
    half = quality.quality_score(pairs, view, 0.5, crowded=0.5)
    assert half == pytest.approx(alone * 0.5 ** quality.CROWDING_POWER, rel=1e-12)
    assert quality.quality_score(pairs, view, 0.5, crowded=1.0) == quality.MIN_SCORE
