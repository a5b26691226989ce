"""Shared fixtures of the export tests: one export per session, made the way users make it.

``python -m export`` (its ``main`` with default options: the dynamo exporter, dynamic batch and
image size) runs once per session on the tiny checkpoint, with ``--verify`` on two images;
every test that needs exported files uses those files, at whatever batch and size it likes.
The dynamo exporter needs tens of seconds per graph on a small CPU, so every test that uses an
export fixture is marked ``slow`` here (``pytest -m "not slow"`` never exports).
"""

from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

#: Fixtures that export; a test using any of them (even through another fixture) is slow.
EXPORT_FIXTURES = {"cli_export", "tiny_export", "static_export"}


def pytest_collection_modifyitems(items):
    for item in items:
        if EXPORT_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def random_image(height: int, width: int, seed: int) -> np.ndarray:
    """(height, width, 3) uint8 RGB: noise plus two flat rectangles."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    img[height // 5: height // 2, width // 6: width // 2] = (220, 40, 40)
    img[height // 2:, width // 2:] = (40, 200, 60)
    return img


@dataclass
class CliRun:
    """One ``python -m export`` run: exit code, what it printed, its output folder, and how
    long it took (seconds)."""

    code: int
    stdout: str
    out: Path
    seconds: float


@pytest.fixture(scope="session")
def cli_export(tmp_path_factory, tiny_checkpoint) -> CliRun:
    """``python -m export --checkpoint tiny.safetensors --output <dir> --name tiny --verify a.png
    b.png``: the default exporter and shapes, verified against PyTorch on two images."""
    from export.__main__ import main

    root = tmp_path_factory.mktemp("export")
    images = [root / "a.png", root / "b.png"]
    Image.fromarray(random_image(120, 160, 11)).save(images[0])
    Image.fromarray(random_image(200, 90, 12)).save(images[1])
    printed = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(printed):
        code = main(["--checkpoint", str(tiny_checkpoint), "--output", str(root / "files"),
                     "--name", "tiny", "--verify", *map(str, images)])
    return CliRun(code, printed.getvalue(), root / "files", time.perf_counter() - start)


@pytest.fixture(scope="session")
def tiny_export(cli_export):
    """The session export's files as an ``ExportResult`` (two graphs and the sidecar)."""
    from export import ExportResult

    files = cli_export.out
    return ExportResult(sidecar=files / "tiny.json",
                        graphs={"automatic": files / "tiny.auto.onnx",
                                "prompt": files / "tiny.prompt.onnx"})


@pytest.fixture(scope="session")
def test_images() -> dict[str, list[np.ndarray]]:
    """Two groups of images of different padded input sizes (min 128, max 256 resize):
    "small" pads to 128x192 / 64x256 / 128x192, "tall" to 256x96 / 160x128 / 256x96."""
    return {
        "small": [random_image(120, 160, 1), random_image(90, 400, 2), random_image(100, 140, 3)],
        "tall": [random_image(300, 100, 4), random_image(260, 220, 5), random_image(250, 90, 6)],
    }
