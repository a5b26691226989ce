"""Helpers shared by the app tests (a module of its own: ``conftest`` names clash)."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
from PIL import Image

#: The server's limits in these tests (small, so the refusals are cheap to trigger).
SERVER_MAX_SIDE = 512
SERVER_MAX_BOXES = 4
SERVER_MAX_UPLOAD_MB = 0.5


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def two_rect_image(path: Path | None = None) -> np.ndarray:
    """(120, 160, 3) uint8: two rectangles; saved as PNG at ``path`` when given."""
    img = np.full((120, 160, 3), 90, dtype=np.uint8)
    img[20:60, 30:80] = (220, 40, 40)
    img[50:110, 90:150] = (40, 200, 60)
    if path is not None:
        Image.fromarray(img).save(path)
    return img
