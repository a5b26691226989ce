"""The post-processing's thread pool: shared, one thread inside its own threads, usable in a
forked child."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest
import torch

import serving.inference.paste as paste
from serving.inference import workers

PROBS = torch.from_numpy(np.random.default_rng(0).random((6, 40, 40)).astype(np.float32))


def _paste(queue) -> None:
    queue.put(paste.mask_crops(PROBS, (160, 160), (160, 160), 0.5).dense().sum())


def test_the_pool_is_shared_and_its_threads_run_work_inline(monkeypatch) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    assert workers.budget() == workers.MAX_THREADS
    assert workers.pool(2) is workers.pool(2)
    assert workers.pool(2).submit(workers.budget).result(timeout=30) == 1


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork")
def test_a_forked_child_gets_a_pool_of_its_own(monkeypatch) -> None:
    """A child forked after the pool ran has none of its threads: the pool is made anew there
    (with the inherited one, the child's paste waited forever)."""
    monkeypatch.setattr(paste, "PARALLEL_PIXELS", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    expected = paste.mask_crops(PROBS, (160, 160), (160, 160), 0.5).dense().sum()
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_paste, args=(queue,))
    child.start()
    child.join(timeout=30)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung on the inherited pool")
    assert queue.get(timeout=5) == expected
