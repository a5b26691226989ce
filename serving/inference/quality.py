"""The score of a box-prompted mask: how good the mask is likely to be.

:func:`quality_score` is the model's box score times the mask's confidence inside its box
(:func:`mask_confidence`), the mean over the box's candidates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor

from ..masks import InstanceMasks


def box_cells(probs: Tensor, input_box: np.ndarray) -> Tensor:
    """The stride-4 probabilities whose cell centres lie inside ``input_box`` (XYXY input
    pixels), flattened (at least the one cell under the box centre)."""
    x1, y1, x2, y2 = (float(v) for v in input_box)
    h4, w4 = probs.shape[-2:]
    c0, c1 = max(0, math.ceil(x1 / 4 - 0.5)), min(w4, math.floor(x2 / 4 - 0.5) + 1)
    r0, r1 = max(0, math.ceil(y1 / 4 - 0.5)), min(h4, math.floor(y2 / 4 - 0.5) + 1)
    if c1 <= c0 or r1 <= r0:
        cy = min(h4 - 1, max(0, int((y1 + y2) / 8)))
        cx = min(w4 - 1, max(0, int((x1 + x2) / 8)))
        return probs[cy:cy + 1, cx:cx + 1].flatten()
    return probs[r0:r1, c0:c1].flatten()


def mask_confidence(probs: Tensor, input_box: np.ndarray) -> float:
    """How decided the mask is inside its box, in [0, 1]: the mean of ``|2p - 1|`` over the
    box's stride-4 cells (1: every cell certainly in or out; 0: every cell at 0.5)."""
    cells = box_cells(probs, input_box).float()
    return float((2 * cells - 1).abs().mean())


def quality_score(pairs: Sequence[tuple[Any, Any]], mask: InstanceMasks,
                  box: np.ndarray) -> float:
    """The score of one box's mask, in [0, 1]: over its candidates ``pairs`` (``(Crop,
    CropResult)`` of :mod:`serving.inference.box_scale`), the mean of the model's box score
    times :func:`mask_confidence`."""
    return float(np.mean([float(r.score) * mask_confidence(r.probs, c.input_box)
                          for c, r in pairs]))
