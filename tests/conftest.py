"""Shared fixtures: a tiny random-weight CondInst checkpoint and small test images."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from sim_testing import TINY_CLASSES, make_tiny_checkpoint, tiny_model_config  # noqa: F401

pytest_plugins = ["training_fixtures"]

# Honour OMP_NUM_THREADS (the documented test command sets 1): two spinning threads on a
# busy 2-core machine cost ~10x the CPU time.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 0)
                      or max(1, min(2, os.cpu_count() or 1)))

@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Path of a tiny random-weight checkpoint (.safetensors), built once per session."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(scope="session")
def sample_image() -> np.ndarray:
    """(120, 160, 3) uint8 RGB: two coloured rectangles on a gray background."""
    img = np.full((120, 160, 3), 90, dtype=np.uint8)
    img[20:60, 30:80] = (220, 40, 40)
    img[50:110, 90:150] = (40, 200, 60)
    return img
