"""The export profile benchmark's FLOP count (hand-computed) and its op summary."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.export_profile import conv_gflop, top


def test_conv_gflop_counts_two_flops_per_multiply_add() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1),  # 8 x 10 x 10 outputs, 27 MACs each
                        nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise: 9 MACs each
                        nn.Conv2d(8, 4, 1, stride=2))  # 4 x 5 x 5 outputs, 8 MACs each
    expected = 2 * (800 * 27 + 800 * 9 + 100 * 8)
    assert conv_gflop(net, torch.zeros(1, 3, 10, 10)) * 1e9 == pytest.approx(expected)
    # Hooks are removed: a second count is the same, not doubled.
    assert conv_gflop(net, torch.zeros(1, 3, 10, 10)) * 1e9 == pytest.approx(expected)


def test_top_sorts_by_time_with_shares() -> None:
    text = top({"Add": 1.0, "Conv": 8.0, "Mul": 1.0}, n=2)
    assert text == "Conv 8 ms (80%), Add 1 ms (10%)"
