"""Shared fixtures of the export tests: one tiny export per session, small test images."""

from __future__ import annotations

import os

import numpy as np
import pytest

#: Exporter of the shared export. The TorchScript exporter takes ~15 s CPU for both graphs,
#: the dynamo exporter a few minutes; ``SIM_TEST_EXPORTER=dynamo`` runs the suite with it
#: (``test_dynamo_export`` covers the dynamo exporter in the default run).
EXPORTER = os.environ.get("SIM_TEST_EXPORTER", "torchscript")


@pytest.fixture(scope="session")
def exporter() -> str:
    """The exporter the shared export used ("torchscript" unless SIM_TEST_EXPORTER says)."""
    return EXPORTER


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, tiny_checkpoint, exporter):
    """ExportResult of the tiny checkpoint (dynamic shapes, opset 18)."""
    from export import export_onnx

    out = tmp_path_factory.mktemp("export")
    return export_onnx(tiny_checkpoint, out, exporter=exporter)


def random_image(height: int, width: int, seed: int) -> np.ndarray:
    """(height, width, 3) uint8 RGB: noise plus two flat rectangles."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    img[height // 5: height // 2, width // 6: width // 2] = (220, 40, 40)
    img[height // 2:, width // 2:] = (40, 200, 60)
    return img


@pytest.fixture(scope="session")
def test_images() -> dict[str, list[np.ndarray]]:
    """Two groups of images with different padded input sizes (min 128, max 256 resize):
    "small" pads to 128x192 / 64x256, "tall" to 256x96 / 256x256 in a batch."""
    return {
        "small": [random_image(120, 160, 1), random_image(90, 400, 2), random_image(100, 140, 3)],
        "tall": [random_image(300, 100, 4), random_image(260, 220, 5), random_image(250, 90, 6)],
    }
