"""Known-answer tests of training.losses.color (Lab conversion, unfold, colour similarity)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.color import rgb2lab

from training.losses.color import image_color_similarity, rgb_to_lab, unfold_wo_center

# (dy, dx) of the 8 neighbours in unfold order, in units of the dilation.
OFFSETS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def _lab_ref(rgb_bchw: np.ndarray) -> np.ndarray:
    """skimage reference: (B, 3, H, W) uint8 -> (B, 3, H, W) float64 Lab."""
    return np.stack([rgb2lab(im.transpose(1, 2, 0)).transpose(2, 0, 1) for im in rgb_bchw])


def test_rgb_to_lab_matches_skimage_random_and_special_colours() -> None:
    rng = np.random.default_rng(0)
    random = rng.integers(0, 256, size=(2, 3, 16, 16), dtype=np.uint8)
    special = np.array(
        [
            [0, 0, 0],
            [255, 255, 255],
            [255, 0, 0],
            [0, 255, 0],
            [0, 0, 255],
            [255, 255, 0],
            [0, 255, 255],
            [255, 0, 255],
            [128, 128, 128],
            [1, 2, 3],
            [10, 10, 10],
            [11, 11, 11],  # either side of the sRGB linear segment (0.04045)
        ],
        dtype=np.uint8,
    ).T.reshape(1, 3, 1, -1)
    grey_ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, None, None], 3, axis=1)
    for rgb in (random, special, grey_ramp):
        ours = rgb_to_lab(torch.from_numpy(rgb)).numpy()
        ref = _lab_ref(rgb)
        assert ours.dtype == np.float32
        # The brief asks for 0.5; float32 reaches far better than that.
        assert np.abs(ours - ref).max() < 1e-2


def test_rgb_to_lab_known_values_and_float_input() -> None:
    rgb = torch.tensor([[0.0, 255.0], [0.0, 255.0], [0.0, 255.0]]).reshape(1, 3, 1, 2)
    lab = rgb_to_lab(rgb)
    torch.testing.assert_close(lab[0, :, 0, 0], torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(lab[0, :, 0, 1], torch.tensor([100.0, 0.0, 0.0]), atol=1e-2, rtol=0)
    uint8 = torch.randint(0, 256, (1, 3, 4, 4), dtype=torch.uint8)
    torch.testing.assert_close(rgb_to_lab(uint8), rgb_to_lab(uint8.float()))


def test_unfold_wo_center_on_arange() -> None:
    x = torch.arange(25, dtype=torch.float32).reshape(1, 1, 5, 5)
    d1 = unfold_wo_center(x, kernel=3, dilation=1)
    assert d1.shape == (1, 1, 8, 5, 5)
    assert d1[0, 0, :, 2, 2].tolist() == [6, 7, 8, 11, 13, 16, 17, 18]
    d2 = unfold_wo_center(x, kernel=3, dilation=2)
    assert d2[0, 0, :, 2, 2].tolist() == [0, 2, 4, 10, 14, 20, 22, 24]
    # Corner (0, 0): only (0,+2), (+2,0), (+2,+2) are inside; the rest is zero padding.
    assert d2[0, 0, :, 0, 0].tolist() == [0, 0, 0, 0, 2, 0, 10, 12]
    # Generic check against explicit shifting, with 2 channels and a batch of 2.
    y = torch.randn(2, 2, 6, 7)
    out = unfold_wo_center(y, kernel=3, dilation=2)
    padded = torch.nn.functional.pad(y, (2, 2, 2, 2))
    for k, (dy, dx) in enumerate(OFFSETS):
        shifted = padded[:, :, 2 + 2 * dy : 2 + 2 * dy + 6, 2 + 2 * dx : 2 + 2 * dx + 7]
        torch.testing.assert_close(out[:, :, k], shifted, rtol=0, atol=0)


def _neighbour_valid(valid_small: np.ndarray, dilation: int = 2) -> np.ndarray:
    """(h, w) bool -> (8, h, w) float: neighbour inside the map and valid."""
    h, w = valid_small.shape
    out = np.zeros((8, h, w), dtype=np.float32)
    for k, (dy, dx) in enumerate(OFFSETS):
        for y in range(h):
            for x in range(w):
                yy, xx = y + dy * dilation, x + dx * dilation
                if 0 <= yy < h and 0 <= xx < w and valid_small[yy, xx]:
                    out[k, y, x] = 1.0
    return out


def test_color_similarity_constant_image_is_one_inside_valid_zero_outside() -> None:
    image = torch.empty(1, 3, 32, 48, dtype=torch.uint8)
    image[:, 0], image[:, 1], image[:, 2] = 37, 200, 90
    valid = torch.zeros(1, 32, 48, dtype=torch.bool)
    valid[:, :22, :37] = True  # real image 22 x 37 (bottom rows already removed), rest padding
    sim = image_color_similarity(image, valid)
    assert sim.shape == (1, 8, 8, 12)
    assert sim.dtype == torch.float32
    # Sampled mask [2::4]: rows 2,6,...,18 (5 rows) and cols 2,...,34 (9 cols) are valid.
    valid_small = valid[0, 2::4, 2::4].numpy()
    assert valid_small.sum() == 5 * 9
    expected = _neighbour_valid(valid_small)
    assert torch.equal(sim[0], torch.from_numpy(expected))


def test_color_similarity_matches_numpy_skimage_reference() -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(2, 3, 16, 24), dtype=np.uint8)
    valid = np.ones((2, 16, 24), dtype=bool)
    valid[1, 10:] = False
    sim = image_color_similarity(torch.from_numpy(images), torch.from_numpy(valid)).numpy()
    for b in range(2):
        # avg-pool 4x4 in float64, truncate like `.byte()`, skimage Lab.
        pooled = images[b].astype(np.float64).reshape(3, 4, 4, 6, 4).mean(axis=(2, 4))
        lab = rgb2lab(pooled.astype(np.uint8).transpose(1, 2, 0)).transpose(2, 0, 1)
        nv = _neighbour_valid(valid[b, 2::4, 2::4])
        expected = np.zeros((8, 4, 6))
        for k, (dy, dx) in enumerate(OFFSETS):
            for y in range(4):
                for x in range(6):
                    yy, xx = y + 2 * dy, x + 2 * dx
                    if 0 <= yy < 4 and 0 <= xx < 6:
                        dist = np.linalg.norm(lab[:, y, x] - lab[:, yy, xx])
                        expected[k, y, x] = np.exp(-0.5 * dist) * nv[k, y, x]
        np.testing.assert_allclose(sim[b], expected, atol=1e-3)


def test_color_similarity_truncates_pooled_values() -> None:
    # Block means 10.9375 (-> 10) and 11.0 (-> 11) must give different Lab values.
    image = torch.full((1, 3, 4, 8), 11, dtype=torch.uint8)
    image[:, :, 0, 0] = 10  # mean of the left block = (15 * 11 + 10) / 16 = 10.9375
    sim = image_color_similarity(image, torch.ones(1, 4, 8, dtype=torch.bool), stride=4, dilation=1)
    lab = rgb2lab(np.array([[[10, 10, 10], [11, 11, 11]]], dtype=np.uint8))
    expected = np.exp(-0.5 * np.linalg.norm(lab[0, 0] - lab[0, 1]))
    assert expected < 0.99
    assert sim[0, 4, 0, 0].item() == pytest.approx(expected, abs=1e-4)  # right neighbour


def test_color_similarity_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        image_color_similarity(
            torch.zeros(1, 3, 30, 32, dtype=torch.uint8), torch.ones(1, 30, 32, dtype=torch.bool)
        )
    with pytest.raises(ValueError):
        image_color_similarity(
            torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.ones(1, 16, 32, dtype=torch.bool)
        )
