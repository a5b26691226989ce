"""Inference backends behind :class:`serving.Segmenter`.

A backend runs the network and the post-processing up to stride-4 mask probabilities in the
network-input frame; the ``Segmenter`` does everything that depends on the original image
(resizing, box mapping, final mask resize and threshold), so all backends share it.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from ..inference.postprocess import Detections, PromptDetections


class Backend(Protocol):
    """What a backend provides.

    ``images`` is always a padded float batch (B, 3, H, W) in 0-255 RGB (not normalised, H and
    W multiples of 32) and ``image_sizes`` the (h, w) of each resized image inside it.
    """

    name: str
    device: str

    def detect(self, images: Tensor, image_sizes: list[tuple[int, int]]) -> list[Detections]:
        """Automatic mode; one ``Detections`` (input frame) per image."""
        ...

    def segment_boxes(self, images: Tensor, image_sizes: list[tuple[int, int]], boxes: Tensor,
                      labels: Tensor) -> PromptDetections:
        """Box-prompted mode; ``boxes`` (B, M, 4) input frame, ``labels`` (B, M), -1 = predict."""
        ...
