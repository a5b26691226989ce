"""The CondInst network (SIM_SPEC sections 0-2)."""

from .build import MODEL_PRESETS, build_condinst
from .condinst import CondInst, CondInstOutputs
from .ops import aligned_bilinear, compute_locations, decode_boxes

__all__ = [
    "MODEL_PRESETS",
    "CondInst",
    "CondInstOutputs",
    "aligned_bilinear",
    "build_condinst",
    "compute_locations",
    "decode_boxes",
]
