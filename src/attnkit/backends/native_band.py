"""The native band kernel (``csrc/band_attention.c``) as the sparse backend runs it: when it takes
a problem, its cost, and its gradient share given a merged LSE. It is not a backend name of its
own: ``backend="sparse"`` runs it for finite bands wherever it runs (see
:mod:`attnkit.kernels.band_native`)."""

from __future__ import annotations

import torch

from ..kernels import band_calibration  # noqa: F401  (on import it gives the band kernel its decision)
from ..kernels.band_native import band_backward, band_native_takes
from ..patterns import finite_band, head_runs
from .base import Grads, Problem
from .facts import finite_bands

NATIVE_MIN_QUERIES = 32
"""From this many queries on the kernel beat masked SDPA at every window measured, up to a window
as long as the sequence (benchmarks/RESULTS.md); with fewer (decoding) it is costed by its pairs."""
NATIVE_PAIR_SHARE = 0.25
"""Cost of a band call of at least NATIVE_MIN_QUERIES queries, as a share of the square: below
SDPA's share (``dense.SDPA_PAIR_COST``) whatever the window."""


def runs(problem: Problem) -> bool:
    """Whether the native kernel runs this problem: every head a finite band, and inputs it takes
    on a machine where it is built and not slower than the planner (``problem.native_band`` when
    the caller settled that)."""
    if not finite_bands(problem):
        return False
    if problem.native_band is not None:
        return problem.native_band
    return band_native_takes(problem.device, problem.dtype, problem.head_dim, problem.value_dim)


def band_pairs(problem: Problem) -> int:
    """The allowed pairs of a band pattern, row by row (``lo <= i - j <= hi`` clipped to the keys):
    about what the kernel computes. Called for few queries (decoding)."""
    n_q, n_k, total = problem.n_q, problem.n_k, 0
    for first, stop, pattern in head_runs(problem.pattern, problem.n_q_heads, 1):
        lo, hi = finite_band(pattern)
        for i in range(n_k - n_q, n_k):
            total += (stop - first) * max(0, min(i - lo, n_k - 1) - max(i - hi, 0) + 1)
    return total


def cost(problem: Problem) -> float:
    if problem.n_q >= NATIVE_MIN_QUERIES:
        return NATIVE_PAIR_SHARE * problem.square
    return float(band_pairs(problem))


def grad_share(problem: Problem, q, k, v, out, lse, d_out, d_lse) -> Grads:
    """The kernel's backward per run of heads that share a band, given the merged ``lse``."""
    groups = q.shape[1] // k.shape[1]
    d_q, d_k, d_v = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for first, stop, pattern in head_runs(problem.pattern, q.shape[1], groups):
        heads, kv = slice(first, stop), slice(first // groups, -(-stop // groups))
        lse_run, d_out_run = lse[:, heads].contiguous(), d_out[:, heads].contiguous()
        delta = (d_out_run * out[:, heads]).sum(-1)
        if d_lse is not None:  # rows without keys (lse = -inf) get no gradient
            delta = delta - torch.where(lse_run == float("-inf"), 0.0, d_lse[:, heads])
        shares = band_backward(
            q[:, heads].contiguous(), k[:, kv].contiguous(), v[:, kv].contiguous(), lse_run, d_out_run,
            delta.contiguous(), finite_band(pattern), problem.scale,
        )
        d_q[:, heads] = shares[0]
        d_k[:, kv] += shares[1]
        d_v[:, kv] += shares[2]
    return d_q, d_k, d_v
