"""A box dataset read from any format (:class:`BoxSet`), and the file helpers its readers
(:mod:`serving.formats.coco`, :mod:`serving.formats.yolo`, :mod:`serving.formats.labelstudio`)
share. :mod:`serving.formats.boxsets` picks the reader and the writer."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DatasetError


@dataclass
class BoxSet:
    """A box dataset read from any format.

    Attributes:
        dataset: COCO-shaped dict (see the module docstring); boxes in original pixels of the
            EXIF-rotated image, which is the frame every format here uses.
        source: the format it was read from (``coco``, ``yolo``, ``labelstudio``).
        path: the file or folder it was read from.
        skipped: ``(where, reason)`` of each refused entry (a YOLO line, a Label Studio
            task or rectangle), ``where`` naming the file and line or the task id.
        extra: what the writer of the same format needs to write the labels back (Label
            Studio tasks, YOLO class names).
    """

    dataset: dict[str, Any]
    source: str
    path: Path
    skipped: list[tuple[str, str]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def read_text_lines(path: Path, what: str) -> list[str]:
    """The lines of a small UTF-8 text file; :class:`DatasetError` naming it if unreadable."""
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise DatasetError(f"{what} {path}: cannot be read ({reason}); fix or re-export it") \
            from None


def read_json_file(path: Path, what: str) -> Any:
    """A JSON file's content; :class:`DatasetError` (one line, naming it) if it is not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise DatasetError(f"{what} {path}: file not found; check the path") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise DatasetError(f"{what} {path}: not valid JSON ({reason}); fix or re-export it") \
            from None


def upright_size(path: Path) -> tuple[int, int] | None:
    """(width, height) of an image file after EXIF rotation, from its header only (nothing
    is decoded); ``None`` when it cannot be read (the job that loads it reports why)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            w, h = img.size
            orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - unreadable: reported when the image is loaded
        return None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)
