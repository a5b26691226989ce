"""The benchmarks' bootstrap interval: known cases, pairing, and a fixed resampling seed."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.common import bootstrap_interval


def _median(x: np.ndarray) -> float:
    return float(np.median(x))


def test_the_interval_of_a_median_holds_it_and_spans_the_sample() -> None:
    x = np.random.default_rng(0).normal(1.3, 0.1, 41)
    low, high = bootstrap_interval((x,), _median, resamples=500)
    assert x.min() < low < np.median(x) < high < x.max()
    assert (low, high) == bootstrap_interval((x,), _median, resamples=500)  # fixed seed
    assert bootstrap_interval((np.full(9, 1.25),), _median, resamples=50) == (1.25, 1.25)


def test_paired_samples_are_resampled_together() -> None:
    x = np.arange(30.0)  # every resample keeps y = 2x, so the ratio is always exactly 2
    low, high = bootstrap_interval((x + 1, 2 * (x + 1)),
                                   lambda a, b: float(np.mean(b / a)), resamples=200)
    assert low == pytest.approx(2.0) and high == pytest.approx(2.0)
