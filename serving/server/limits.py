"""The HTTP server's limits: its settings, and the sizes it admits requests by.

Imported by :mod:`serving.server.requests` and :mod:`serving.server.app`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from ..inference.boxes import mask_pixels  # noqa: F401 (the server's admission cost)
from ..inference.images import MAX_IMAGE_PIXELS
from ..prompts import DEFAULT_MAX_REQUEST_BOXES
from .admission import DEFAULT_ADMISSION_WAIT_S, DEFAULT_MEMORY_BUDGET_MB

#: Memory for the masks of the requests in flight (boolean crops: one byte per pixel).
MASK_MEMORY_BYTES = 512 << 20
#: Default ``--max-mask-pixels``: half the budget, as two requests can be in flight at once
#: (a large one in its own lane and a batch of small ones, each batch at most this much).
DEFAULT_MAX_MASK_PIXELS = MASK_MEMORY_BYTES // 2


@dataclass(frozen=True)
class ServerSettings:
    """Limits, timeouts and batching of the server (the flags of ``python -m serving serve``).

    Attributes:
        max_boxes: the most prompt boxes one request may hold (:attr:`request_boxes`).
        max_mask_pixels: the pixels one request's masks may cover (:func:`mask_pixels`: box
            areas summed; automatic mode: the image), which bounds its mask memory (a byte
            per pixel) and work; more -> 413. Also the most a batch of small requests holds.
        large_boxes: requests with more prompt boxes than this, or costing more than
            ``max_mask_pixels // 8``, run alone in the large lane.
        keep_alive_s: an idle connection (no request under way) is closed after this.
        body_timeout_s: a request body must arrive within this (else 408).
        shutdown_grace_s: on SIGTERM, ``/readyz`` answers 503 for this long while requests
            are still served; then the server stops accepting and drains.
        memory_budget_mb: the bytes all requests in flight may hold together, from the first
            byte of their bodies to their answers (:mod:`serving.server.admission`).
        admission_wait_s: how long a request may wait for room in that budget (then 503).
    """

    max_batch: int = 8
    max_wait_ms: float = 10.0
    max_body_mb: float = 20.0
    max_pixels: int = MAX_IMAGE_PIXELS
    max_boxes: int | None = None  # None: DEFAULT_MAX_REQUEST_BOXES
    max_queue: int = 64  # requests waiting for a batch; more get 503 (bounded memory)
    warmup: bool = True
    max_mask_pixels: int = DEFAULT_MAX_MASK_PIXELS
    large_boxes: int = 32
    keep_alive_s: float = 5.0
    body_timeout_s: float = 60.0
    shutdown_grace_s: float = 5.0
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB
    admission_wait_s: float = DEFAULT_ADMISSION_WAIT_S

    def __post_init__(self) -> None:
        if self.max_pixels > MAX_IMAGE_PIXELS:
            raise ValueError(f"max_pixels={self.max_pixels} is above the ceiling of "
                             f"{MAX_IMAGE_PIXELS} pixels that the image decoder accepts; "
                             f"use at most {MAX_IMAGE_PIXELS}")

    @property
    def memory_budget_bytes(self) -> int:
        return int(self.memory_budget_mb * (1 << 20))

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def large_cost(self) -> int:
        """Requests whose :func:`mask_pixels` exceed this run alone in the large lane."""
        return max(1, self.max_mask_pixels // 8)

    @property
    def request_boxes(self) -> int:
        """The most prompt boxes one request may hold (``--max-boxes``): a size policy of
        this server. Not the model's per-pass ``max_prompt_boxes``: the Segmenter runs more
        boxes than that in several passes."""
        return DEFAULT_MAX_REQUEST_BOXES if self.max_boxes is None else int(self.max_boxes)


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) declared by an image file's header, read by the first PIL format
    plugin that accepts it, without PIL's decompression-bomb refusal (which hides the size);
    ``None`` when no plugin reads it. Nothing is decoded."""
    from PIL import Image

    prefix = data[:16]
    for loader in (Image.preinit, Image.init):
        loader()
        for fmt in list(Image.ID):
            factory, accept = Image.OPEN[fmt]
            if accept is not None and accept(prefix) is not True:
                continue
            try:
                with factory(io.BytesIO(data), "") as img:
                    return tuple(int(v) for v in img.size)  # type: ignore[return-value]
            except Exception:  # noqa: BLE001 (this plugin cannot read it; try the next)
                continue
    return None


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header declares: (width, height) as displayed (EXIF rotation
    applied) and Pillow's ``mode``. ``None`` fields: no Pillow plugin reads the header."""

    width: int
    height: int
    mode: str

    @property
    def pixels(self) -> int:
        return self.width * self.height


def _orientation(img: Any) -> int:
    """The EXIF orientation an opened (not decoded) image declares, 1 when unknown. Only EXIF
    read with the header counts: ``getexif()`` would decode a whole PNG to look for an eXIf
    chunk after the pixels (that image's boxes are checked again once decoded)."""
    from PIL import Image

    try:
        raw = img.info.get("exif")
        if raw:
            exif = Image.Exif()
            exif.load(raw)
        elif img.format == "TIFF":  # tags are in the header
            exif = img.getexif()
        else:
            return 1
        return int(exif.get(0x0112, 1))
    except Exception:  # noqa: BLE001 (a broken EXIF block: the decoder ignores it too)
        return 1


def read_header(data: bytes) -> ImageHeader | None:
    """The header of an encoded image file, without decoding a pixel (``None``: unreadable;
    the decoder then says why). Past Pillow's decompression-bomb refusal the size is read by
    :func:`header_size` (mode unknown: counted as the costliest); when that fails too,
    Pillow's ``DecompressionBombError`` is raised."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if _orientation(img) in (5, 6, 7, 8):
                w, h = h, w
            return ImageHeader(int(w), int(h), str(img.mode))
    except Image.DecompressionBombError:
        size = header_size(data)
        if size is None:
            raise
        return ImageHeader(size[0], size[1], "I")
    except Exception:  # noqa: BLE001 (not readable: load_image reports why)
        return None
