"""Colour-space helpers and the BoxInst neighbour colour similarity (SIM_SPEC section 6.1/6.2).

Everything here is a pure tensor function that runs on the device of its inputs (CPU or
CUDA), vectorised over the batch and the pixels. The upstream code converts RGB to Lab with
``skimage.color.rgb2lab`` on the CPU, one image at a time (SIM_SPEC section 12, item 14);
:func:`rgb_to_lab` reproduces that conversion (sRGB gamma, sRGB->XYZ matrix, D65 / 2 degree
white point, CIE Lab with the linear segment) so it can run on the GPU instead.

Shapes use ``B`` for the batch, ``H, W`` for the padded input size (multiples of 32,
docs/CONVENTIONS.md) and ``h, w = H / stride, W / stride`` for the mask-logit grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["image_color_similarity", "rgb_to_lab", "unfold_wo_center"]

# sRGB (linear) -> CIE XYZ matrix of the sRGB specification; the same values as
# skimage.color.colorconv.xyz_from_rgb (SIM_SPEC section 12, item 14: match skimage).
_XYZ_FROM_RGB = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
# Reference white of illuminant D65, 2 degree observer (skimage's default for rgb2lab).
_D65_WHITE = (0.95047, 1.0, 1.08883)
# sRGB gamma: linear segment below 0.04045, else ((c + 0.055) / 1.055) ** 2.4.
_SRGB_THRESHOLD = 0.04045
# CIE Lab f(t): cube root above 0.008856, else 7.787 t + 16/116 (skimage's constants).
_LAB_EPSILON = 0.008856
_LAB_KAPPA = 7.787

# Colour-similarity constants of BoxInst (SIM_SPEC section 6.2): exp(-||dLab|| * 0.5).
_COLOR_SIGMA_SCALE = 0.5


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """Convert RGB in 0..255 to CIE Lab (D65, 2 degree observer), like ``skimage.color.rgb2lab``.

    Args:
        rgb: ``(B, 3, H, W)`` RGB, any real dtype (uint8 or float), values in ``[0, 255]``.

    Returns:
        ``(B, 3, H, W)`` float32 Lab: L in ``[0, 100]``, a and b roughly in ``[-128, 127]``.
        Matches skimage on uint8 input to within about 1e-4 (float32 rounding).

    Autocast is disabled inside so a bf16/fp16 region cannot lower the precision of the
    3x3 colour matrix product.
    """
    if rgb.dim() != 4 or rgb.shape[1] != 3:
        raise ValueError(f"rgb_to_lab expects (B, 3, H, W), got {tuple(rgb.shape)}")
    with torch.autocast(device_type=rgb.device.type, enabled=False):
        c = rgb.to(torch.float32) / 255.0
        # sRGB electro-optical transfer (gamma) -> linear RGB.
        linear = torch.where(c > _SRGB_THRESHOLD, ((c + 0.055) / 1.055).pow(2.4), c / 12.92)
        matrix = torch.tensor(_XYZ_FROM_RGB, dtype=torch.float32, device=rgb.device)
        white = torch.tensor(_D65_WHITE, dtype=torch.float32, device=rgb.device)
        # XYZ_k = sum_c M[k, c] * RGB_c, then normalise by the reference white.
        xyz = torch.einsum("kc,bchw->bkhw", matrix, linear) / white.view(1, 3, 1, 1)
        # torch.pow of a non-negative base; clamp guards tiny negative rounding values.
        f = torch.where(
            xyz > _LAB_EPSILON,
            xyz.clamp(min=0.0).pow(1.0 / 3.0),
            _LAB_KAPPA * xyz + 16.0 / 116.0,
        )
        fx, fy, fz = f.unbind(dim=1)
        lightness = 116.0 * fy - 16.0
        a = 500.0 * (fx - fy)
        b = 200.0 * (fy - fz)
        return torch.stack((lightness, a, b), dim=1)


def unfold_wo_center(x: Tensor, kernel: int, dilation: int) -> Tensor:
    """Gather the ``kernel * kernel - 1`` dilated neighbours of every pixel (SIM_SPEC 6.2).

    Args:
        x: ``(N, C, H, W)`` floating tensor.
        kernel: odd kernel size (3 in BoxInst).
        dilation: spacing between neighbours (2 in BoxInst).

    Returns:
        ``(N, C, kernel * kernel - 1, H, W)``. Neighbour ``k`` of pixel ``(y, x)`` is the pixel
        ``(y + dy, x + dx)`` for the kernel offsets in row-major order with the centre left
        out; for ``kernel=3, dilation=d`` the order is ``(-d,-d), (-d,0), (-d,+d), (0,-d),
        (0,+d), (+d,-d), (+d,0), (+d,+d)`` as ``(dy, dx)``. Neighbours outside the image are 0
        (zero padding of ``F.unfold``).
    """
    if x.dim() != 4:
        raise ValueError(f"unfold_wo_center expects (N, C, H, W), got {tuple(x.shape)}")
    if kernel % 2 != 1:
        raise ValueError(f"kernel must be odd, got {kernel}")
    h, w = x.shape[-2:]
    # Padding that keeps the output size: (k + (d - 1)(k - 1)) // 2 (SIM_SPEC 6.2). Shifted
    # slices of one padded copy instead of F.unfold: the same values without im2col's
    # (N, C*k*k, H*W) column buffer, about 4x faster on CPU for the pairwise loss.
    padding = (kernel + (dilation - 1) * (kernel - 1)) // 2
    padded = F.pad(x, (padding, padding, padding, padding))
    centre = kernel * kernel // 2
    views = []
    for k in range(kernel * kernel):
        if k == centre:
            continue
        dy, dx = (k // kernel) * dilation, (k % kernel) * dilation
        views.append(padded[:, :, dy:dy + h, dx:dx + w])
    return torch.stack(views, dim=2)


def image_color_similarity(
    images_uint8_rgb: Tensor,
    valid: Tensor,
    stride: int = 4,
    kernel: int = 3,
    dilation: int = 2,
) -> Tensor:
    """Lab colour similarity of each stride-``stride`` pixel to its dilated neighbours.

    Follows SIM_SPEC 6.1/6.2: the unnormalised padded image is average-pooled with a
    ``stride x stride`` window and truncated to integers (upstream ``.byte()``), converted to
    Lab, and ``S(i, j) = exp(-||Lab_i - Lab_j||_2 * 0.5)`` is computed for the
    ``kernel * kernel - 1`` neighbours ``j`` (order of :func:`unfold_wo_center`), multiplied
    by the neighbour's ``valid`` value sampled at ``[stride//2::stride, stride//2::stride]``.

    Args:
        images_uint8_rgb: ``(B, 3, H, W)`` uint8 (or integral float) RGB 0..255, padded with 0;
            H and W divisible by ``stride``.
        valid: ``(B, H, W)`` bool, True on real image pixels. The caller removes the bottom
            rows (``BOTTOM_PIXELS_REMOVED``, SIM_SPEC 6.1) before calling.
        stride: mask-logit stride (``MASK_OUT_STRIDE = 4``).
        kernel: neighbourhood size (3).
        dilation: neighbour spacing on the stride grid (2).

    Returns:
        ``(B, kernel * kernel - 1, H / stride, W / stride)`` float32 in ``[0, 1]``; 0 wherever
        the neighbour is outside ``valid`` (or outside the image). No gradient flows.
    """
    if images_uint8_rgb.dim() != 4 or images_uint8_rgb.shape[1] != 3:
        raise ValueError(
            f"images_uint8_rgb must be (B, 3, H, W), got {tuple(images_uint8_rgb.shape)}"
        )
    b, _, height, width = images_uint8_rgb.shape
    if tuple(valid.shape) != (b, height, width):
        raise ValueError(f"valid must be {(b, height, width)}, got {tuple(valid.shape)}")
    if height % stride or width % stride:
        raise ValueError(f"image size {(height, width)} is not divisible by stride {stride}")
    with torch.no_grad(), torch.autocast(device_type=images_uint8_rgb.device.type, enabled=False):
        pooled = F.avg_pool2d(images_uint8_rgb.to(torch.float32), kernel_size=stride, stride=stride)
        # Upstream `.byte()` after pooling: truncation towards zero (values are >= 0).
        # The mean of 16 integers is exact in float32, so floor reproduces it bit-exactly.
        pooled = torch.floor(pooled)
        lab = rgb_to_lab(pooled)  # (B, 3, h, w)
        neighbours = unfold_wo_center(lab, kernel, dilation)  # (B, 3, K, h, w)
        distance = torch.linalg.vector_norm(lab[:, :, None] - neighbours, dim=1)
        similarity = torch.exp(-distance * _COLOR_SIGMA_SCALE)  # (B, K, h, w)
        start = stride // 2  # image mask sampled at [2::4, 2::4] (SIM_SPEC 6.1)
        valid_small = valid[:, None, start::stride, start::stride].to(torch.float32)
        neighbour_valid = unfold_wo_center(valid_small, kernel, dilation)[:, 0]
        return similarity * neighbour_valid
