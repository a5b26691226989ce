"""Error types of the library.

Every error raised for bad user input is one of these, with a one-line message that names
the input and says how to fix it (DESIGN.md section 7). Command-line entry points catch
``SimError`` and print ``error: <message>`` instead of a traceback.
"""

from __future__ import annotations


class SimError(Exception):
    """Base class of every error this project raises on purpose."""


class InputError(SimError, ValueError):
    """A user-provided input (image, boxes, labels, option) is invalid."""


class ImageError(InputError):
    """An image cannot be read or decoded."""


class BoxError(InputError):
    """Prompt boxes are malformed (reversed, zero-area, NaN, too many)."""


class CheckpointError(SimError):
    """A checkpoint or exported model file is missing, corrupt or mismatched."""


class DatasetError(SimError, ValueError):
    """A dataset annotation file is malformed or inconsistent."""


class WeightsError(SimError):
    """Pretrained backbone weights are not available (for example offline, no cache)."""
