"""Reading images from anything a user may hand us, into RGB uint8 arrays.

Every loader returns an ``np.ndarray`` of shape ``(H, W, 3)``, dtype ``uint8``, RGB order,
with the EXIF orientation applied (so pixel coordinates match what image viewers show).
Grayscale, palette, RGBA/LA (composited on black), CMYK and 16-bit images are converted.
Failures raise :class:`serving.errors.ImageError` with a one-line message.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageError

ImageLike = Union[str, os.PathLike, bytes, np.ndarray, Image.Image]

#: Largest image accepted, in pixels (PIL's decompression-bomb guard uses the same idea).
MAX_IMAGE_PIXELS = 64_000_000
#: Smallest side accepted, in pixels. Smaller images cannot hold one stride-8 location.
MIN_IMAGE_SIDE = 8

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def describe_image(source: ImageLike) -> str:
    """How error messages name an image: its path, ``<N bytes>`` or ``<type name>``."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    return f"<{type(source).__name__}>"


def _pil_to_rgb(img: Image.Image, name: str) -> np.ndarray:
    """Convert any PIL mode to an RGB uint8 array; 16-bit and float data are rescaled."""
    img = ImageOps.exif_transpose(img) or img
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0  # 65535 -> 255
        else:
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    rgb = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))


def _array_to_rgb(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ImageError(
            f"image {name}: expected an HxW, HxWx3 or HxWx4 array, got shape {tuple(arr.shape)}"
        )
    if arr.dtype == np.uint16:
        arr = np.rint(arr.astype(np.float64) / 257.0).astype(np.uint8)
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageError(f"image {name}: contains NaN or inf; pass finite pixel values")
        scale = 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0
        arr = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise ImageError(
            f"image {name}: unsupported dtype {arr.dtype}; pass uint8 RGB (or uint16/float)"
        )
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        alpha = arr[:, :, 3:4].astype(np.float32) / 255.0
        arr = np.rint(arr[:, :, :3].astype(np.float32) * alpha).astype(np.uint8)
    return np.ascontiguousarray(arr)


def _check_pixels(width: int, height: int, name: str) -> None:
    if height < MIN_IMAGE_SIDE or width < MIN_IMAGE_SIDE:
        raise ImageError(
            f"image {name}: {width}x{height} pixels is too small; both sides must be at least "
            f"{MIN_IMAGE_SIDE} pixels"
        )
    if height * width > MAX_IMAGE_PIXELS:
        raise ImageError(
            f"image {name}: {width}x{height} pixels exceeds the limit of {MAX_IMAGE_PIXELS} "
            "pixels; downscale it first"
        )


def _check_size(arr: np.ndarray, name: str) -> np.ndarray:
    _check_pixels(arr.shape[1], arr.shape[0], name)
    return arr


def _open_pil(data: Union[str, os.PathLike, bytes], name: str) -> np.ndarray:
    """Decode a file or encoded bytes. Thread-safe: no process-wide state is changed.

    Two guards run before any pixel is decoded: PIL's own decompression-bomb check inside
    ``Image.open`` (its process-wide ``Image.MAX_IMAGE_PIXELS``, left as the application set
    it) and ours, ``MAX_IMAGE_PIXELS``, on the size the file's header declares.
    """
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise ImageError(f"image {name}: file not found; check the path")
        if path.stat().st_size == 0:
            raise ImageError(f"image {name}: file is empty (0 bytes); re-export or remove it")
        fp: Union[Path, io.BytesIO] = path
    else:
        if len(data) == 0:
            raise ImageError(f"image {name}: empty upload (0 bytes); send the image file")
        fp = io.BytesIO(data)
    try:
        with Image.open(fp) as img:  # reads the header only
            _check_pixels(*img.size, name)
            img.load()
            return _pil_to_rgb(img, name)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(
            f"image {name}: refused by the decompression-bomb guard (more pixels than "
            f"Pillow allows, and our limit is {MAX_IMAGE_PIXELS}); downscale it first"
        ) from None
    except UnidentifiedImageError:
        raise ImageError(
            f"image {name}: not a readable image (supported: JPEG, PNG, BMP, TIFF, WebP)"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(
            f"image {name}: corrupt or truncated ({reason}); re-export the file"
        ) from None


def load_image(source: ImageLike) -> np.ndarray:
    """Read ``source`` into an RGB ``uint8`` array of shape ``(H, W, 3)``.

    Args:
        source: a file path, the encoded bytes of an image file, a PIL image, or a numpy array
            (``HxW`` gray, ``HxWx3`` RGB or ``HxWx4`` RGBA; uint8, uint16, bool or float in
            [0, 1] / [0, 255]).

    Raises:
        ImageError: the source cannot be decoded, is empty, too small or too large.
    """
    name = describe_image(source)
    if isinstance(source, np.ndarray):
        arr = _array_to_rgb(source, name)
    elif isinstance(source, Image.Image):
        try:
            arr = _pil_to_rgb(source, name)
        except OSError as exc:
            raise ImageError(f"image {name}: cannot decode ({exc}); re-export it") from None
    elif isinstance(source, (str, os.PathLike, bytes)):
        arr = _open_pil(source, name)
    else:
        raise ImageError(
            f"image {name}: unsupported type; pass a path, bytes, a PIL image or a numpy array"
        )
    return _check_size(arr, name)
