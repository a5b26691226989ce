"""Shared fixtures of the export tests: one export per session, made the way users make it.

``python -m export`` (its ``main`` with default options: the dynamo exporter, dynamic batch and
image size, plus ``--int8 --calibration``) runs once per session on the tiny "sharp" checkpoint
(``export_checkpoint``), with ``--verify`` on two images; every test that needs exported files
(fp32 or INT8) uses those files, at whatever batch and size it likes.
The dynamo exporter needs tens of seconds per graph on a small CPU, so every test that uses an
export fixture is marked ``slow`` here (``pytest -m "not slow"`` never exports).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytest
from export_images import random_image
from PIL import Image

#: Fixtures that export; a test using any of them (even through another fixture) is slow.
EXPORT_FIXTURES = {"cli_export", "tiny_export", "int8_export", "static_export"}


def pytest_collection_modifyitems(items):
    for item in items:
        if EXPORT_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@dataclass
class CliRun:
    """One ``python -m export`` run: exit code, what it printed, its output folder, the
    calibration folder it used, and how long it took (seconds)."""

    code: int
    stdout: str
    out: Path
    calibration: Path
    seconds: float


def _files(out: Path, stem: str):
    from export import ExportResult

    return ExportResult(sidecar=out / f"{stem}.json",
                        graphs={"automatic": out / f"{stem}.auto.onnx",
                                "prompt": out / f"{stem}.prompt.onnx"})


def _shared_folder(tmp_path_factory, name: str) -> tuple[Path, contextlib.AbstractContextManager]:
    """A folder made once per test run and a lock to hold while filling it: under
    pytest-xdist every worker sees the same folder (beside the workers' own temporary
    folders), so the session export runs in one worker and the others wait for its files."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        return tmp_path_factory.mktemp(name), contextlib.nullcontext()
    from filelock import FileLock

    folder = tmp_path_factory.getbasetemp().parent / name
    return folder, FileLock(str(folder) + ".lock")


@pytest.fixture(scope="session")
def export_checkpoint(tmp_path_factory):
    """The tiny architecture with spread scores and real-sized boxes (``sharp``), so that INT8
    and fp32 detections can be matched; every export fixture exports it."""
    from sim_testing import make_tiny_checkpoint

    folder, lock = _shared_folder(tmp_path_factory, "export_ckpt")
    path = folder / "tiny.safetensors"
    with lock:
        if not path.exists():
            folder.mkdir(exist_ok=True)
            make_tiny_checkpoint(path, sharp=True)
    return path


@pytest.fixture(scope="session")
def cli_export(tmp_path_factory, export_checkpoint) -> CliRun:
    """``python -m export --checkpoint tiny.safetensors --output <dir> --name tiny --int8
    --calibration cal --calibration-count 3 --verify a.png b.png``: the default exporter and
    shapes, quantised on 3 of 4 images, both verified against PyTorch on two images (once per
    test run, also with pytest-xdist)."""
    root, lock = _shared_folder(tmp_path_factory, "export")
    with lock:
        record = root / "run.json"
        if not record.exists():
            root.mkdir(exist_ok=True)
            run = _export_once(root, export_checkpoint)
            record.write_text(json.dumps({**asdict(run), "out": str(run.out),
                                          "calibration": str(run.calibration)}))
    saved = json.loads(record.read_text())
    return CliRun(saved["code"], saved["stdout"], Path(saved["out"]),
                  Path(saved["calibration"]), saved["seconds"])


def _export_once(root: Path, checkpoint: Path) -> CliRun:
    from export.__main__ import main

    images = [root / "a.png", root / "b.png"]
    Image.fromarray(random_image(120, 160, 11)).save(images[0])
    Image.fromarray(random_image(200, 90, 12)).save(images[1])
    cal = root / "cal"
    cal.mkdir()
    for i in range(4):
        Image.fromarray(random_image(120 + 20 * i, 160, i)).save(cal / f"{i}.png")
    printed = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(printed):
        code = main(["--checkpoint", str(checkpoint), "--output", str(root / "files"),
                     "--name", "tiny", "--int8", "--calibration", str(cal),
                     "--calibration-count", "3", "--verify", *map(str, images)])
    return CliRun(code, printed.getvalue(), root / "files", cal, time.perf_counter() - start)


@pytest.fixture(scope="session")
def tiny_export(cli_export):
    """The session export's fp32 files as an ``ExportResult`` (two graphs and the sidecar)."""
    assert cli_export.code == 0, cli_export.stdout
    return _files(cli_export.out, "tiny")


@pytest.fixture(scope="session")
def int8_export(cli_export):
    """The session export's INT8 files as an ``ExportResult``."""
    assert cli_export.code == 0, cli_export.stdout
    return _files(cli_export.out, "tiny.int8")


@pytest.fixture(scope="session")
def test_images() -> dict[str, list[np.ndarray]]:
    """Two groups of images of different padded input sizes (min 128, max 256 resize):
    "small" pads to 128x192 / 64x256 / 128x192, "tall" to 256x96 / 160x128 / 256x96."""
    return {
        "small": [random_image(120, 160, 1), random_image(90, 400, 2), random_image(100, 140, 3)],
        "tall": [random_image(300, 100, 4), random_image(260, 220, 5), random_image(250, 90, 6)],
    }
