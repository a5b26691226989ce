"""Log-domain Sinkhorn-Knopp for SIM's prototype assignment (SIM_SPEC 7.7, section 12 item 12).

The authors' ``distributed_sinkhorn`` (copied from SwAV/ProtoSeg) works on ``Q = exp(s / eps)``
without any stabilisation, which overflows in fp32 for large pixel sets and at once under fp16.
Per "Our decisions" we run the same iteration in the log domain with ``logsumexp`` and always in
float32, even inside an autocast region.

The SwAV iteration on ``Q`` (``N`` pixels x ``K`` prototypes) is::

    Q /= sum(Q)
    repeat iters: Q /= col_sums; Q /= K     (each prototype gets total mass 1/K)
                  Q /= row_sums; Q /= N     (each pixel gets total mass 1/N)
    Q *= N                                  (rows sum to 1, columns to about N/K)

Every ``/= constant`` is a uniform shift in the log domain that the next normalisation removes,
so in log space the iteration reduces to alternately subtracting the column and the row
log-sum-exp. The result is identical (up to rounding) to the exp-domain version; rows sum to 1
exactly after the final step and column sums approach ``N/K``.

Several independent problems (one per class) can be solved in one vectorised call by passing
``groups``: each group's columns are normalised over that group's rows only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["AllReduceSum", "hard_assign", "sinkhorn_log"]

AllReduceSum = Callable[[Tensor], Tensor]
"""``f(t) -> t'``: the element-wise sum of ``t`` over all processes (same shape, same dtype).
Identity when training on one process. It may work in place and return its argument."""

# Defaults of the authors' ``distributed_sinkhorn(init_q, iters=3, eps=0.05)`` (SIM_SPEC 7.7).
SINKHORN_EPSILON = 0.05
SINKHORN_ITERS = 3


def _group_col_logsumexp(
    logq: Tensor, groups: Tensor, num_groups: int, all_reduce_sum: AllReduceSum | None
) -> Tensor:
    """Per-group column log-sum-exp over the rows of each group, across processes.

    Args:
        logq: ``(N, K)`` float32 log-masses.
        groups: ``(N,)`` int64 group of each row, in ``[0, num_groups)``.
        num_groups: ``G``.
        all_reduce_sum: cross-process sum, or ``None`` for a single process.

    Returns:
        ``(G, K)`` float32; ``-inf`` for a group without rows on any process.
    """
    n, k = logq.shape
    idx = groups[:, None].expand(n, k)
    neg_inf = torch.full((num_groups, k), float("-inf"), dtype=logq.dtype, device=logq.device)
    # Local, stable: shift every group-column by its local maximum.
    local_max = neg_inf.scatter_reduce(0, idx, logq, reduce="amax", include_self=True)
    shift = torch.where(torch.isfinite(local_max), local_max, torch.zeros_like(local_max))
    sums = torch.zeros_like(local_max).index_add_(0, groups, torch.exp(logq - shift[groups]))
    local = torch.log(sums) + shift  # (G, K), -inf where the group has no local rows
    if all_reduce_sum is None:
        return local
    # Across processes the shift must be common to all of them, and only a sum is available:
    # use the mean of the finite local values, and sum exp(local - common) in float64. It
    # overflows only when one process's log-mass exceeds that mean by more than ~709 nats,
    # far beyond cosine scores (|s / eps| <= 20 for eps = 0.05) and any pixel count.
    finite = torch.isfinite(local)
    packed = torch.stack([torch.where(finite, local, torch.zeros_like(local)), finite.float()])
    packed = all_reduce_sum(packed)
    common = packed[0] / packed[1].clamp(min=1.0)
    total = all_reduce_sum(torch.exp((local - common).double()))  # 0 for absent groups
    return (torch.log(total) + common).to(logq.dtype)


def sinkhorn_log(
    scores: Tensor,
    epsilon: float = SINKHORN_EPSILON,
    iters: int = SINKHORN_ITERS,
    groups: Tensor | None = None,
    num_groups: int | None = None,
    all_reduce_sum: AllReduceSum | None = None,
) -> Tensor:
    """Soft equipartition assignment of ``N`` items to ``K`` prototypes (SIM_SPEC 7.7, step 3).

    Computed in float32 with autocast disabled (SIM_SPEC 12 item 12), for any input dtype.

    Args:
        scores: ``(N, K)`` similarities (cosines in SIM; any float dtype, any magnitude).
        epsilon: entropic temperature; ``Q0 = exp(scores / epsilon)`` (0.05, SIM_SPEC 7.7).
        iters: number of (column, row) normalisation rounds (3, SIM_SPEC 7.7). With 0 the
            result is the row softmax of ``scores / epsilon``.
        groups: optional ``(N,)`` int64 problem index of each row; every group is an
            independent Sinkhorn problem whose columns are normalised over its own rows
            (used to solve all classes at once). ``None``: one problem.
        num_groups: number of groups ``G`` (default ``groups.max() + 1``; pass it explicitly in
            distributed runs so every process reduces tensors of the same shape).
        all_reduce_sum: cross-process sum (see :data:`AllReduceSum`). When given, the column
            sums are global over all processes' rows (SwAV's distributed Sinkhorn); every
            process must call this function the same number of times, also with ``N == 0``.

    Returns:
        ``(N, K)`` float32 ``Q``: each row sums to 1; the columns of each group sum to about
        ``N_g / K`` (exactly in the limit of many iterations), ``N_g`` counting the rows of all
        processes.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (N, K), got {tuple(scores.shape)}")
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    n = scores.shape[0]
    if groups is None:
        groups = torch.zeros(n, dtype=torch.long, device=scores.device)
        num_groups = 1
    elif groups.shape != (n,):
        raise ValueError(f"groups must be ({n},), got {tuple(groups.shape)}")
    if num_groups is None:
        num_groups = int(groups.max().item()) + 1 if n > 0 else 1
    with torch.autocast(device_type=scores.device.type, enabled=False):
        logq = scores.float() / epsilon
        groups = groups.long()
        for _ in range(iters):
            # Prototype (column) step: each prototype of a group gets the same total mass.
            logq = logq - _group_col_logsumexp(logq, groups, num_groups, all_reduce_sum)[groups]
            # Pixel (row) step, local: each row sums to 1 (SwAV's /N then *N cancel).
            logq = logq - torch.logsumexp(logq, dim=1, keepdim=True)
        if iters == 0:
            logq = torch.log_softmax(logq, dim=1)
        return torch.exp(logq)


def hard_assign(q: Tensor) -> Tensor:
    """Hard assignment ``argmax_l Q_il`` (paper Eq. 5, ``1(Q_il = 1)``; SIM_SPEC 12 item 2).

    Replaces the authors' ``gumbel_softmax(Q, hard=True)``, which re-randomises about 80 % of
    the assignments.

    Args:
        q: ``(N, K)`` assignment matrix.

    Returns:
        ``(N,)`` int64 prototype index of each row.
    """
    return q.argmax(dim=1)
