"""Fixtures for the training-loop and benchmark tests (registered in tests/conftest.py): the
tiny dataset (generated once per session), a config
factory pointing at it, and one complete tiny run (run A) shared by the loop, resume and
evaluation tests. Everything runs on the CPU with ``configs/tiny.yaml`` (MobileNetV2-FPN at 32
channels, random init, 96-160 px images); helpers live in ``train_helpers.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from train_helpers import SIM_EXERCISE, TINY_CONFIG, Recorder, TinyData, TinyRun


@pytest.fixture(scope="session")
def one_torch_thread():
    """One intra-op thread for these tests (restored afterwards).

    tests/conftest.py asks for 2 threads; on 2 cores shared with other jobs that makes a tiny
    training run about 10x slower (115 s instead of 10 s, measured), and one thread keeps the
    bitwise resume comparison free of any thread-count dependence.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> TinyData:
    """The tiny config's synthetic dataset (12 images of 128 px), generated once."""
    from training.data.synthetic import generate_dataset
    from training.train_config import load_config

    cfg = load_config(TINY_CONFIG)
    root = tmp_path_factory.mktemp("tiny_data")
    paths = generate_dataset(root, cfg.data.synthetic_images, seed=cfg.data.synthetic_seed,
                             size=cfg.data.synthetic_size)
    return TinyData(root, paths["train"], paths["val"], paths["images"])


@pytest.fixture(scope="session")
def tiny_cfg(tiny_data: TinyData) -> Callable[..., Any]:
    """``tiny_cfg(output_dir, *overrides)`` -> TrainConfig of configs/tiny.yaml on tiny_data."""
    from training.train_config import load_config

    def make(output_dir: Path | str, *extra: str) -> Any:
        return load_config(TINY_CONFIG, [*tiny_data.overrides(output_dir), *extra])

    return make


@pytest.fixture(scope="session")
def tiny_run(tiny_cfg, tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    from training.train import train

    out = tmp_path_factory.mktemp("run_a")
    cfg = tiny_cfg(out, *SIM_EXERCISE)
    rec = Recorder()
    result = train(cfg, callbacks=[rec])
    return TinyRun(cfg, out, result, rec.records)
