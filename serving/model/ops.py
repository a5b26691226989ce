"""Small tensor operations shared by the network, post-processing and training."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def eager_no_grad() -> bool:
    """True in plain eager inference: no autograd, tracing, scripting, ``torch.compile``,
    ``torch.export`` or ONNX export. Fast paths with data-dependent Python control flow
    (chunk loops, skipping padded slots) run only then; graphs keep the fixed-shape code."""
    return not (torch.is_grad_enabled() or torch.jit.is_tracing() or torch.jit.is_scripting()
                or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export())


def aligned_bilinear(x: Tensor, factor: int) -> Tensor:
    """Upsample ``x`` (N, C, h, w) by an integer ``factor`` to (N, C, factor*h, factor*w).

    CondInst's "aligned" bilinear upsampling (SIM_SPEC section 2.4): replicate-pad right and
    bottom by one pixel, bilinear with ``align_corners=True`` to ``(f*h + 1, f*w + 1)``,
    replicate-pad left and top by ``f // 2`` and crop to ``(f*h, f*w)``. Output index ``m``
    samples input coordinate ``m / f`` shifted by ``-(f // 2) / f``, which keeps stride-``s``
    pixel centres aligned. Used in training and inference alike, and it exports to ONNX
    (Pad + Resize), so the exported graph matches the trained model.
    """
    if factor == 1:
        return x
    h, w = x.shape[-2:]
    x = F.pad(x, (0, 1, 0, 1), mode="replicate")
    x = F.interpolate(x, size=(factor * h + 1, factor * w + 1), mode="bilinear",
                      align_corners=True)
    x = F.pad(x, (factor // 2, 0, factor // 2, 0), mode="replicate")
    return x[:, :, : factor * h, : factor * w]


def compute_locations(height: int, width: int, stride: int, device: torch.device,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """Pixel centres of a stride-``stride`` feature map of size (height, width).

    Returns:
        (height * width, 2) tensor of (x, y) input-pixel coordinates ``stride*j + stride//2``,
        row-major (y outer, x inner), matching ``feature.flatten(2)`` order.
    """
    shifts_x = torch.arange(width, device=device, dtype=dtype) * stride + stride // 2
    shifts_y = torch.arange(height, device=device, dtype=dtype) * stride + stride // 2
    yy, xx = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
    return torch.stack((xx.reshape(-1), yy.reshape(-1)), dim=1)


def patch_neighbours(height: int, width: int, offset: int, device: torch.device) -> Tensor:
    """Flat indices of each location's 3x3 neighbourhood in a (height, width) feature map.

    Returns:
        (height * width, 9) int64, row-major locations (as :func:`compute_locations`); column
        ``3 * (dy + 1) + (dx + 1)`` holds ``offset + (y + dy) * width + (x + dx)``, or -1 where
        that neighbour lies outside the map (a 3x3 convolution's zero padding).
    """
    taps = torch.arange(-1, 2, device=device)
    y = torch.arange(height, device=device)[:, None, None, None] + taps[:, None]  # (h,1,3,1)
    x = torch.arange(width, device=device)[None, :, None, None] + taps  # (1,w,1,3)
    inside = (y >= 0) & (y < height) & (x >= 0) & (x < width)  # (h, w, 3, 3)
    flat = torch.where(inside, y * width + x + offset, torch.full_like(y * x, -1))
    return flat.reshape(height * width, 9)


def decode_boxes(locations: Tensor, box_reg: Tensor, strides: Tensor) -> Tensor:
    """FCOS box decoding.

    Args:
        locations: (..., N, 2) (x, y) in input pixels.
        box_reg: (..., N, 4) distances (l, t, r, b) in units of the location's stride.
        strides: (..., N) stride of each location (broadcastable to box_reg[..., 0]).

    Returns:
        (..., N, 4) boxes XYXY in input pixels.
    """
    dist = box_reg * strides[..., None]
    x, y = locations[..., 0], locations[..., 1]
    return torch.stack(
        (x - dist[..., 0], y - dist[..., 1], x + dist[..., 2], y + dist[..., 3]), dim=-1
    )


def box_iou_pairwise(a: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of aligned box pairs: ``a`` and ``b`` broadcast to (..., 4) XYXY -> (...,)."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    return inter / (area_a + area_b - inter).clamp(min=eps)
