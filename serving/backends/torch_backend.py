"""PyTorch eager backend (CPU or CUDA, optional bf16/fp16 autocast).

With ``dtype="bf16"`` (or fp16 on CUDA) the **network** (backbone, FPN, heads, mask branch)
runs under ``torch.autocast``; its outputs are cast back to fp32 before anything numerically
fragile: locations (always fp32), box decoding, sigmoid scores, top-k, NMS, the dynamic mask
head, the prompt IoU weighting and mask thresholding all run in fp32, outside autocast. bf16
is accepted on a CPU only where it has native bf16 instructions (AVX512_BF16 or AMX on x86,
BF16 on Arm): without them autocast emulates bf16 and is slower than fp32.
"""

from __future__ import annotations

import platform
from functools import lru_cache

import torch
from torch import Tensor

from ..errors import InputError
from ..inference.postprocess import Detections, PromptDetections, detect, segment_boxes
from ..inference.transforms import valid_pixels
from ..model import CondInst
from ..model_config import InferenceConfig

#: ``--dtype`` names -> the autocast dtype (None: plain fp32).
DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16,
                                         "fp16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" -> CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """"fp32"/None -> None, "bf16"/torch.bfloat16 -> torch.bfloat16, "fp16" -> torch.float16."""
    if dtype is None or dtype == torch.float32:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.bfloat16, torch.float16):
            return dtype
        raise InputError(f"dtype={dtype}: choose one of {', '.join(DTYPES)}")
    name = str(dtype).lower()
    if name not in DTYPES:
        raise InputError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def cpu_flags() -> set[str]:
    """This CPU's feature flags (``/proc/cpuinfo``'s ``flags``, or ``Features`` on Arm;
    empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_int8_vnni() -> bool:
    """Whether this x86 CPU has VNNI instructions (AVX512-VNNI, AVX-VNNI or AMX-INT8), with
    which ONNX Runtime's int8 kernels sum the products in int32; without them (AVX2) they add
    pairs of products into int16 first (``export.quantize`` keeps weights to 7 bits for it)."""
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())


@lru_cache(maxsize=1)
def cpu_bf16_support() -> str | None:
    """The native bf16 instructions of this CPU ("AVX512_BF16", "AMX_BF16", "BF16" on Arm),
    or None. Asks torch first (its x86 CPU-feature checks), then ``/proc/cpuinfo``."""
    checks = (("AMX_BF16", "_is_amx_tile_supported"), ("AVX512_BF16", "_is_avx512_bf16_supported"))
    for name, fn in checks:
        try:
            if getattr(torch.cpu, fn)():
                return name
        except (AttributeError, RuntimeError):
            continue
    flags = cpu_flags()
    for name, flag in (("AMX_BF16", "amx_bf16"), ("AVX512_BF16", "avx512_bf16")):
        if flag in flags:
            return name
    if platform.machine().lower() in ("aarch64", "arm64") and "bf16" in flags:
        return "BF16"
    return None


def check_dtype(dtype: torch.dtype | None, device: torch.device) -> None:
    """Raise :class:`InputError` (one line, with the reason) when ``device`` cannot run the
    network in ``dtype`` fast: fp16 needs CUDA; bf16 needs CUDA with bf16 support or a CPU
    with native bf16 instructions."""
    if dtype is None:
        return
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    if device.type == "cuda":
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise InputError("--dtype bf16: this GPU has no bf16 support; use --dtype fp16")
        return
    if device.type != "cpu":
        raise InputError(f"--dtype {name}: supported on cpu and cuda devices, not {device}")
    if dtype == torch.float16:
        raise InputError("--dtype fp16: needs a CUDA GPU; on the CPU use --dtype bf16 (where "
                         "supported) or an INT8 ONNX export (python -m export --int8)")
    if cpu_bf16_support() is None:
        raise InputError("--dtype bf16: this CPU has no native bf16 instructions (AVX512_BF16, "
                         "AMX or Arm BF16), so bf16 would be slower than fp32; use --dtype fp32 "
                         "or an INT8 ONNX export (python -m export --int8)")


class TorchBackend:
    """Runs a :class:`CondInst` and :mod:`serving.inference.postprocess` under
    ``inference_mode``; ``dtype`` (bf16/fp16 or their names) runs the network in autocast."""

    name = "torch"

    def __init__(self, model: CondInst, cfg: InferenceConfig, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype | None = None) -> None:
        self.torch_device = resolve_device(device)
        self.dtype = parse_dtype(dtype)  # None: fp32
        check_dtype(self.dtype, self.torch_device)
        self.device = str(self.torch_device)
        self.model = model.to(self.torch_device).eval()
        if self.dtype is not None and self.torch_device.type == "cpu":
            # oneDNN's bf16 convolutions are fast in NHWC; NCHW bf16 is slower than fp32.
            self.model = self.model.to(memory_format=torch.channels_last)
        self.cfg = cfg

    @property
    def precision(self) -> str:
        """"fp32", "bf16" or "fp16"."""
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def _forward(self, images: Tensor, image_sizes: Tensor):
        images = images.to(self.torch_device)
        x = self.model.normalize(images, valid_pixels(images, image_sizes))
        if self.dtype is not None:
            if self.torch_device.type == "cpu":
                x = x.contiguous(memory_format=torch.channels_last)
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
