"""``serving.masks``: the outline of a mask and masks built from a window of the image."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from serving.masks import InstanceMasks, outline

CROSS = ndimage.generate_binary_structure(2, 1)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (6, 1), (2, 2), (9, 13), (40, 31)])
def test_outline_is_the_mask_minus_its_erosion(shape):
    """A pixel is on the outline when a 4-neighbour is outside the mask or the array: the
    mask minus its erosion by a cross with the outside counted as background (scipy)."""
    rng = np.random.default_rng(sum(shape))
    for fill in (0.0, 0.5, 0.9, 1.0):
        mask = rng.random(shape) < fill
        want = mask & ~ndimage.binary_erosion(mask, CROSS, border_value=0)
        assert np.array_equal(outline(mask), want)


def test_outline_by_hand():
    mask = np.zeros((5, 5), bool)
    mask[1:4, 1:4] = True
    want = mask.copy()
    want[2, 2] = False  # the only pixel whose 4 neighbours are all in the mask
    assert np.array_equal(outline(mask), want)
    assert outline(np.ones((3, 3), bool)).sum() == 8  # the array's edge is outside


def test_from_dense_in_a_window_places_each_crop_in_the_image():
    window = np.zeros((2, 4, 5), bool)
    window[0, 1:3, 2:4] = True  # mask 0: rows 1-2, columns 2-3 of the window
    masks = InstanceMasks.from_dense(window, origin=(10, 20), image_size=(30, 40))
    assert masks.image_size == (30, 40)
    assert masks.box(0) == (11, 22, 13, 24)
    assert masks.offsets[1].tolist() == [0, 0] and masks.crops[1].shape == (0, 0)  # empty
    dense = masks.dense()
    assert dense[0].sum() == 4 and dense[0, 11:13, 22:24].all() and not dense[1].any()
    assert np.array_equal(InstanceMasks.from_dense(window).dense(), window)  # no window
