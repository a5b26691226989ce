"""SIM (Semantic-aware Instance Mask generation) training parts as pure tensor modules.

- :mod:`~training.sim.sinkhorn`: log-domain fp32 Sinkhorn and hard assignment (SIM_SPEC 7.7).
- :mod:`~training.sim.prototypes`: class prototypes, their update and the semantic map M_S.
- :mod:`~training.sim.pseudo`: pseudo masks, weight masks and copy-paste importance (7.6, 7.8).
- :mod:`~training.sim.copypaste`: memory bank and online copy-paste (7.8).
- :mod:`~training.sim.ema`: the momentum teacher (7.1).

The instance map M_I is computed by ``serving.inference.assign.weighted_instance_map``.
"""

from __future__ import annotations

from training.sim.copypaste import (
    MemoryBank,
    PasteResult,
    masks_to_boxes,
    paste,
    paste_instances,
)
from training.sim.ema import EMATeacher, unwrap_model
from training.sim.prototypes import PrototypeMemory, l2_normalize_vectors
from training.sim.pseudo import (
    PseudoMask,
    full_resolution_masks,
    instance_importance,
    pseudo_masks,
)
from training.sim.sinkhorn import AllReduceSum, hard_assign, sinkhorn_log

__all__ = [
    "AllReduceSum",
    "EMATeacher",
    "MemoryBank",
    "PasteResult",
    "PrototypeMemory",
    "PseudoMask",
    "full_resolution_masks",
    "hard_assign",
    "instance_importance",
    "l2_normalize_vectors",
    "masks_to_boxes",
    "paste",
    "paste_instances",
    "pseudo_masks",
    "sinkhorn_log",
    "unwrap_model",
]
