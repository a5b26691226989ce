"""PyTorch eager backend (CPU or CUDA, optional bf16/fp16 autocast)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import InferenceConfig
from ..inference.postprocess import Detections, PromptDetections, detect, segment_boxes
from ..inference.transforms import valid_pixels
from ..model import CondInst


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" -> CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class TorchBackend:
    """Runs a :class:`CondInst` and :mod:`serving.inference.postprocess` under
    ``inference_mode``."""

    name = "torch"

    def __init__(self, model: CondInst, cfg: InferenceConfig, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None) -> None:
        self.torch_device = resolve_device(device)
        self.device = str(self.torch_device)
        self.model = model.to(self.torch_device).eval()
        self.cfg = cfg
        self.dtype = dtype  # None: fp32; torch.bfloat16 / float16 run the network in autocast

    def _forward(self, images: Tensor, image_sizes: Tensor):
        images = images.to(self.torch_device)
        x = self.model.normalize(images, valid_pixels(images, image_sizes))
        if self.dtype is not None:
            with torch.autocast(self.torch_device.type, dtype=self.dtype):
                out = self.model(x)
            return type(out)(*(t.float() if t.is_floating_point() else t for t in out))
        return self.model(x)

    @torch.inference_mode()
    def detect(self, images: Tensor, image_sizes: list[tuple[int, int]]) -> list[Detections]:
        sizes = torch.tensor(image_sizes, dtype=torch.int64, device=self.torch_device)
        outputs = self._forward(images, sizes)
        return detect(self.model, outputs, sizes, self.cfg).unpad()

    @torch.inference_mode()
    def segment_boxes(self, images: Tensor, image_sizes: list[tuple[int, int]], boxes: Tensor,
                      labels: Tensor) -> PromptDetections:
        sizes = torch.tensor(image_sizes, dtype=torch.int64, device=self.torch_device)
        outputs = self._forward(images, sizes)
        return segment_boxes(self.model, outputs, boxes.to(self.torch_device).float(),
                             labels.to(self.torch_device), self.cfg)
