"""Test-time geometry: shortest-edge resize, padding to multiples of 32, box mapping.

The same functions prepare images for every backend and for training's evaluation, so a model
sees identical inputs in PyTorch, ONNX Runtime and TensorRT.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ImageError

SIZE_DIVISIBILITY = 32
#: Shortest side an image may have after resizing, in pixels (as ``MIN_IMAGE_SIDE`` before).
MIN_RESIZED_SIDE = 8


def resized_shape(height: int, width: int, min_size: int, max_size: int,
                  name: str = "image") -> tuple[int, int]:
    """detectron2's ResizeShortestEdge: shorter side to ``min_size`` unless the longer side
    would exceed ``max_size``. Returns the new (height, width).

    Rule: both resized sides must be at least ``MIN_RESIZED_SIDE`` (8) pixels, so the aspect
    ratio (longer / shorter side) may be at most ``max_size / 8`` (166:1 at the default 1333).

    Raises:
        ImageError: a more extreme aspect ratio (``name`` names the image in the message).
    """
    scale = min_size / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    size = int(round(height * scale)), int(round(width * scale))
    if min(size) < MIN_RESIZED_SIDE:
        limit = max_size / MIN_RESIZED_SIDE
        raise ImageError(
            f"image {name}: {width}x{height} pixels has an aspect ratio of "
            f"{max(height, width) / min(height, width):.0f}:1, above this model's limit of "
            f"{limit:.0f}:1 (max_size {max_size} / {MIN_RESIZED_SIDE} px); crop or split it"
        )
    return size


def canvas_size(height: int, width: int, divisibility: int = SIZE_DIVISIBILITY,
                ) -> tuple[int, int]:
    """The padded (H, W) of a resized (height, width) image: each side rounded up to a
    multiple of ``divisibility``. Images share a batch only when their canvases are equal,
    so a result never depends on the other images of its batch."""
    return -(-height // divisibility) * divisibility, -(-width // divisibility) * divisibility


def valid_pixels(images: Tensor, image_sizes: Tensor) -> Tensor:
    """Where the images are: (B, C, H, W) padded batch and (B, 2) int64 (h, w) of each image
    inside its top-left corner -> (B, H, W) bool, True on image pixels, False on padding.

    Fixed shapes and no Python loop, so the same function runs eagerly and in exported graphs.
    """
    h, w = images.shape[-2:]
    sizes = image_sizes.to(images.device)
    rows = torch.arange(h, device=images.device)[None, :] < sizes[:, 0:1]  # (B, H)
    cols = torch.arange(w, device=images.device)[None, :] < sizes[:, 1:2]  # (B, W)
    return rows[:, :, None] & cols[:, None, :]


def resize_image(image: Tensor, size: tuple[int, int]) -> Tensor:
    """(3, H, W) uint8 or float 0-255 -> (3, h, w) float32 0-255, bilinear with antialiasing.

    One channel at a time (the same values as all three at once): the float copy of a large
    uint8 image is one channel's, not three (192 MB instead of 576 MB at 8000x6000).
    """
    if tuple(image.shape[-2:]) == tuple(size):
        return image.float().clamp_(0, 255)
    out = torch.empty((image.shape[0], *size), dtype=torch.float32, device=image.device)
    for c in range(image.shape[0]):
        out[c] = F.interpolate(image[c][None, None].float(), size=size, mode="bilinear",
                               align_corners=False, antialias=True)[0, 0]
    return out.clamp_(0, 255)


def pad_batch(images: list[Tensor], divisibility: int = SIZE_DIVISIBILITY) -> tuple[Tensor, Tensor]:
    """Zero-pad (3, h_i, w_i) images to one (B, 3, H, W) batch, H and W multiples of 32.

    Returns:
        batch (B, 3, H, W) with the images' dtype, and valid (B, H, W) bool (True on pixels).
    """
    hp, wp = canvas_size(max(int(im.shape[-2]) for im in images),
                         max(int(im.shape[-1]) for im in images), divisibility)
    batch = images[0].new_zeros((len(images), 3, hp, wp))
    for i, im in enumerate(images):
        batch[i, :, : im.shape[-2], : im.shape[-1]] = im
    sizes = torch.tensor([tuple(im.shape[-2:]) for im in images], dtype=torch.int64)
    return batch, valid_pixels(batch, sizes)


def preprocess(images: list[np.ndarray], min_size: int, max_size: int,
               device: torch.device | str = "cpu", valid: bool = True,
               ) -> tuple[Tensor, Tensor | None, list[tuple[int, int]]]:
    """RGB uint8 (H, W, 3) arrays -> padded float batch (B, 3, H, W) in 0-255 (not normalised),
    valid mask (B, H, W) (``None`` when ``valid`` is False), and the resized (h, w) of each
    image (:func:`image_batch` at the sizes :func:`resized_shape` gives)."""
    sizes = [resized_shape(img.shape[0], img.shape[1], min_size, max_size) for img in images]
    batch = image_batch(images, sizes).to(device)
    mask = valid_pixels(batch, torch.tensor(sizes, dtype=torch.int64)) if valid else None
    return batch, mask, sizes


def image_batch(images: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]],
                canvas: tuple[int, int] | None = None) -> Tensor:
    """RGB uint8 (H, W, 3) arrays, each resized to its (h, w) of ``sizes``, at the top left
    of a zero-padded float32 batch (B, 3, Hc, Wc) in 0-255; ``canvas`` (Hc, Wc) defaults to
    :func:`canvas_size` of the largest.

    The same tensor as ``pad_batch([resize_image(image, size) ...])``, written straight into
    the batch: an image that needs no resize is converted uint8 -> float by numpy into its
    place (one single-threaded pass: small multi-threaded torch copies stall on a busy CPU),
    and only the padding is zeroed.
    """
    hp, wp = canvas or canvas_size(max(h for h, _ in sizes), max(w for _, w in sizes))
    array = np.empty((len(images), 3, hp, wp), dtype=np.float32)
    batch = torch.from_numpy(array)
    for i, (img, (h, w)) in enumerate(zip(images, sizes, strict=True)):
        array[i, :, h:] = 0
        array[i, :, :h, w:] = 0
        if tuple(img.shape[:2]) == (h, w):
            np.copyto(array[i, :, :h, :w], np.moveaxis(img, 2, 0), casting="unsafe")
        else:
            tensor = torch.from_numpy(np.require(img, requirements=["C", "W"])).permute(2, 0, 1)
            batch[i, :, :h, :w] = resize_image(tensor, (h, w))
    return batch


def scale_boxes(boxes: np.ndarray, from_size: tuple[int, int],
                to_size: tuple[int, int]) -> np.ndarray:
    """Map (N, 4) XYXY boxes between two frames of sizes (h, w) (float32 result)."""
    sy = to_size[0] / from_size[0]
    sx = to_size[1] / from_size[1]
    factors = np.array([sx, sy, sx, sy], dtype=np.float32)
    return (np.asarray(boxes, dtype=np.float32).reshape(-1, 4) * factors).astype(np.float32)
