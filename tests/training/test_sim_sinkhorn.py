"""Known-answer tests of the log-domain Sinkhorn (training/sim/sinkhorn.py, SIM_SPEC 7.7)."""

from __future__ import annotations

import pytest
import torch
from sim_testing import run_two_processes

from training.sim.sinkhorn import hard_assign, sinkhorn_log


def _cosine_scores(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    f = torch.nn.functional.normalize(torch.randn(n, 16, generator=g), dim=1)
    p = torch.nn.functional.normalize(torch.randn(k, 16, generator=g), dim=1)
    return f @ p.T


def _naive_sinkhorn(scores: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """The exp-domain SwAV/ProtoSeg iteration exactly as in SIM_SPEC 7.7 step 3 (float64)."""
    q = torch.exp(scores.double() / eps).T  # (K, N)
    k, n = q.shape
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= n
    q *= n
    return q.T


def test_marginals_after_many_iterations() -> None:
    n, k = 200, 10
    q = sinkhorn_log(_cosine_scores(n, k), epsilon=0.05, iters=50)
    assert q.dtype == torch.float32 and q.shape == (n, k)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(n), atol=1e-5, rtol=0)
    torch.testing.assert_close(q.sum(dim=0), torch.full((k,), n / k), atol=1e-3, rtol=0)


def test_default_three_iterations_more_uniform_than_softmax() -> None:
    n, k = 300, 10
    s = _cosine_scores(n, k, seed=1)
    soft = torch.softmax(s / 0.05, dim=1)
    q = sinkhorn_log(s)
    dev_soft = (soft.sum(dim=0) - n / k).abs().max()
    dev_q = (q.sum(dim=0) - n / k).abs().max()
    assert dev_q < 0.5 * dev_soft
    torch.testing.assert_close(q.sum(dim=1), torch.ones(n), atol=1e-5, rtol=0)


def test_equals_naive_exp_domain() -> None:
    s = _cosine_scores(40, 5, seed=2)
    for iters in (1, 3, 7):
        q = sinkhorn_log(s, epsilon=0.05, iters=iters)
        ref = _naive_sinkhorn(s, 0.05, iters)
        torch.testing.assert_close(q.double(), ref, atol=1e-5, rtol=1e-4)


def test_zero_iterations_is_row_softmax() -> None:
    s = _cosine_scores(20, 4, seed=3)
    torch.testing.assert_close(sinkhorn_log(s, iters=0), torch.softmax(s / 0.05, dim=1))


def test_large_scores_stay_finite() -> None:
    s = _cosine_scores(64, 6, seed=4) * 1e3  # exp(2e4) overflows even float64
    assert not torch.isfinite(torch.exp(s.double() / 0.05)).all()
    q = sinkhorn_log(s, epsilon=0.05, iters=3)
    assert torch.isfinite(q).all()
    assert (q >= 0).all() and (q <= 1).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(64), atol=1e-5, rtol=0)


def test_fp32_under_bfloat16_autocast() -> None:
    s = _cosine_scores(50, 5, seed=5).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = sinkhorn_log(s)
    assert q.dtype == torch.float32
    torch.testing.assert_close(q, sinkhorn_log(s.float()))


def test_groups_equal_separate_problems() -> None:
    s = _cosine_scores(30, 4, seed=6)
    groups = torch.tensor([0] * 12 + [2] * 18)  # group 1 empty
    q = sinkhorn_log(s, groups=groups, num_groups=3)
    torch.testing.assert_close(q[:12], sinkhorn_log(s[:12]))
    torch.testing.assert_close(q[12:], sinkhorn_log(s[12:]))


def test_hard_assign_is_argmax() -> None:
    q = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])
    assert hard_assign(q).tolist() == [1, 0]
    assert hard_assign(q).dtype == torch.int64


@pytest.mark.parametrize("scale", [1.0, 50.0])
def test_distributed_matches_single_process(scale: float) -> None:
    """Two threads with a barrier-based all_reduce_sum behave like two processes.

    ``scale = 50`` puts the per-process column log-masses hundreds of nats apart, beyond
    float32's exp range, which the float64 cross-process sum must absorb.
    """
    s = _cosine_scores(40, 5, seed=7) * scale
    groups = torch.tensor([0, 1] * 20)
    parts = [(s[:25], groups[:25]), (s[25:], groups[25:])]
    def step(rank: int, all_reduce_sum):
        x, g = parts[rank]
        return sinkhorn_log(x, groups=g, num_groups=2, all_reduce_sum=all_reduce_sum)

    out = run_two_processes(step)
    ref = sinkhorn_log(s, groups=groups, num_groups=2)
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[1]).all()
    torch.testing.assert_close(torch.cat([out[0], out[1]]), ref)
