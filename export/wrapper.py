"""Export-only modules: the CondInst network plus the library's post-processing, tensor in,
tensor out, with fixed names.

These modules should not be called directly; they are traced by :mod:`export.onnx`. Their
``forward`` is the library's own code and nothing else: ``valid_pixels`` and
``CondInst.normalize``, the network, then :func:`serving.inference.postprocess.detect` or
:func:`~serving.inference.postprocess.segment_boxes`, the same functions the torch backend runs
eagerly. Traced, those functions take their fixed-shape path (NMS as the graph operator
``sim::multiclass_nms_keep``, masks for every slot), so the outputs are padded to
``max_detections``.
"""

from __future__ import annotations

from torch import Tensor, nn

from serving.backends.exported import AUTO_INPUTS, AUTO_OUTPUTS, PROMPT_INPUTS, PROMPT_OUTPUTS
from serving.inference.postprocess import detect, segment_boxes
from serving.inference.transforms import valid_pixels
from serving.model import CondInst
from serving.model_config import InferenceConfig

__all__ = ["AUTO_INPUTS", "AUTO_OUTPUTS", "PROMPT_INPUTS", "PROMPT_OUTPUTS", "AutomaticGraph",
           "PromptGraph"]


class AutomaticGraph(nn.Module):
    """Automatic instance segmentation, padded to ``max_detections`` = K.

    Inputs: ``images`` (B, 3, H, W) float RGB 0-255, zero-padded, H and W multiples of 32;
    ``image_sizes`` (B, 2) int64 (h, w) of each resized image inside the padding.

    Outputs (network-input frame), the fields of
    :class:`serving.inference.postprocess.PaddedDetections`: ``boxes``
    (B, K, 4) float XYXY, ``scores`` (B, K) sorted descending, ``labels`` (B, K) int64 (-1 in
    unused slots), ``masks`` (B, K, H/4, W/4) float probabilities at stride 4,
    ``num_detections`` (B,) int64. Unused slots are zero.
    """

    def __init__(self, model: CondInst, cfg: InferenceConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg

    def forward(self, images: Tensor, image_sizes: Tensor) -> tuple[Tensor, ...]:
        model = self.model
        out = model(model.normalize(images, valid_pixels(images, image_sizes)))
        return tuple(detect(model, out, image_sizes, self.cfg))


class PromptGraph(nn.Module):
    """Box-prompted segmentation (the paper's M_I), one row per prompt box.

    Inputs: ``images`` and ``image_sizes`` as :class:`AutomaticGraph`; ``boxes`` (B, M, 4)
    float XYXY in the network-input frame; ``labels`` (B, M) int64 class per box, -1 to predict.

    Outputs: ``masks`` (B, M, H/4, W/4) float probabilities at stride 4, ``scores`` (B, M),
    ``labels`` (B, M) int64 (given or predicted).
    """

    def __init__(self, model: CondInst, cfg: InferenceConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg

    def forward(self, images: Tensor, image_sizes: Tensor, boxes: Tensor,
                box_labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        model = self.model
        out = model(model.normalize(images, valid_pixels(images, image_sizes)))
        result = segment_boxes(model, out, boxes, box_labels, self.cfg)
        return result.mask_probs, result.scores, result.labels
