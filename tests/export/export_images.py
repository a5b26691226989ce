"""Images for the export tests (calibration folders, verification images, parity inputs)."""

from __future__ import annotations

import numpy as np


def random_image(height: int, width: int, seed: int) -> np.ndarray:
    """(height, width, 3) uint8 RGB: noise plus two flat rectangles (objects to find)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    img[height // 5: height // 2, width // 6: width // 2] = (220, 40, 40)
    img[height // 2:, width // 2:] = (40, 200, 60)
    return img
