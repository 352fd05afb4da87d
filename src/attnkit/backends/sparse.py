"""The ``"sparse"`` backend: the sparse planner (work in proportion to the allowed pairs), and the
native band kernel (``kernels/csrc/band_attention.c``) for finite bands where it runs.

Whether the native kernel runs is decided here, once per call (:func:`native_bands`), and handed
to the kernel as its ``native_bands`` argument; the kernels themselves decide nothing. The
native kernel is not a backend name of its own."""

from __future__ import annotations

import math

import torch

from ..kernels.band_calibration import band_decision
from ..kernels.band_native import NATIVE_SCORE_MODS, band_backward, band_native_takes
from ..kernels.sparse import sparse_kernel, sparse_plan_pairs
from ..kernels.sparse_plan import document_piece
from ..patterns import finite_band, head_runs
from .base import Backend, Grads, Problem, tiled_grad_share, with_parameters
from .dense import SDPA_PAIR_COST
from .facts import documents_with_score_mod, finite_bands, planned

NATIVE_MIN_QUERIES = 32
"""From this many queries on the kernel beat masked SDPA at every window measured, up to a window
as long as the sequence (benchmarks/RESULTS.md); with fewer (decoding) it is costed by its pairs."""
NATIVE_PAIR_SHARE = 0.25
"""Cost of a band call of at least NATIVE_MIN_QUERIES queries, as a share of the square: below
SDPA's share (``dense.SDPA_PAIR_COST``) whatever the window."""
DOCUMENT_PAIR_COST = SDPA_PAIR_COST
"""Cost per computed pair of a document plan: its units are bands without masks, run by the native
kernel or by SDPA's own fused kernel, so a pair costs what an entry of SDPA's square does (one
causal document is SDPA's causal call, not a masked one)."""


def native_bands(problem: Problem) -> bool:
    """Whether this call's bands (a head's whole pattern, or the band parts of its plan) run the
    native kernel: it takes the inputs (float32 on the CPU, equal widths that are multiples of
    16, a built library) and it is not slower than the planner on this CPU
    (:func:`~attnkit.kernels.band_calibration.band_decision`). ``problem.native_band``, when set,
    is taken as the answer (what-if questions such as :func:`~.policy.choose_backend`). Decided
    once per call: the answer is kept in ``problem.memo`` for the cost, forward and backward."""
    if problem.native_band is not None:
        return problem.native_band
    memo = problem.memo
    if memo is None:
        memo = problem.memo = {}
    answer = memo.get("native_bands")
    if answer is None:
        takes = band_native_takes(problem.device, problem.dtype, problem.head_dim, problem.value_dim)
        answer = memo["native_bands"] = takes and band_decision().native
    return answer


def _runs_natively(problem: Problem) -> bool:
    """Whether the whole call is the native kernel's: every head a finite band that it runs."""
    return finite_bands(problem) and native_bands(problem)


def band_pairs(problem: Problem) -> int:
    """The allowed pairs of a band pattern, row by row (``lo <= i - j <= hi`` clipped to the keys):
    about what the native kernel computes. Called for few queries (decoding)."""
    n_q, n_k, total = problem.n_q, problem.n_k, 0
    for first, stop, pattern in head_runs(problem.pattern, problem.n_q_heads, 1):
        lo, hi = finite_band(pattern)
        for i in range(n_k - n_q, n_k):
            total += (stop - first) * max(0, min(i - lo, n_k - 1) - max(i - hi, 0) + 1)
    return total


def _native_grad_share(problem: Problem, q, k, v, out, lse, d_out, d_lse) -> Grads:
    """The native kernel's backward per run of heads that share a band, given the merged ``lse``."""
    groups = q.shape[1] // k.shape[1]
    d_q, d_k, d_v = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    params = problem.parameters()
    d_parameter = torch.zeros(params[0].shape, dtype=torch.float32) if params else None
    for first, stop, pattern in head_runs(problem.pattern, q.shape[1], groups):
        heads, kv = slice(first, stop), slice(first // groups, -(-stop // groups))
        lse_run, d_out_run = lse[:, heads].contiguous(), d_out[:, heads].contiguous()
        delta = (d_out_run * out[:, heads]).sum(-1)
        if d_lse is not None:  # rows without keys (lse = -inf) get no gradient
            delta = delta - torch.where(lse_run == float("-inf"), 0.0, d_lse[:, heads])
        head_mod = None if problem.score_mod is None else problem.score_mod.for_heads(first, stop)
        shares = band_backward(
            q[:, heads].contiguous(), k[:, kv].contiguous(), v[:, kv].contiguous(), lse_run, d_out_run,
            delta.contiguous(), finite_band(pattern), problem.scale, head_mod,
        )
        d_q[:, heads] = shares[0]
        d_k[:, kv] += shares[1]
        d_v[:, kv] += shares[2]
        if d_parameter is not None:
            d_parameter[heads] = shares[3]
    return with_parameters(problem, (d_q, d_k, d_v), None if d_parameter is None else d_parameter.to(params[0].dtype))


class SparseBackend(Backend):
    name = "sparse"
    description = "the sparse planner (work follows the allowed pairs) and the native band kernel"
    score_mods = NATIVE_SCORE_MODS

    def accepts(self, problem):
        reason = self.takes_arguments(problem)
        if reason is None and documents_with_score_mod(problem):
            return "it does not apply a score_mod to Document patterns yet (blockwise does)"
        return reason

    def cost(self, problem):
        if _runs_natively(problem):
            if problem.n_q >= NATIVE_MIN_QUERIES:
                return NATIVE_PAIR_SHARE * problem.square
            return float(band_pairs(problem))
        if planned(problem):
            pairs = float(sparse_plan_pairs(problem.pattern, problem.n_q, problem.n_k, problem.n_q_heads))
            return DOCUMENT_PAIR_COST * pairs if document_piece(problem.pattern) is not None else pairs
        return math.inf

    def forward(self, problem, q, k, v):
        return sparse_kernel(q, k, v, problem.pattern, problem.scale, native_bands=native_bands(problem),
                             score_mod=problem.score_mod)

    def grad_share(self, problem, q, k, v, out, lse, d_out, d_lse):
        if _runs_natively(problem):
            return _native_grad_share(problem, q, k, v, out, lse, d_out, d_lse)
        # The planner's fused backward takes no LSE gradient: the blockwise kernel's share (exact).
        return tiled_grad_share(problem, q, k, v, out, lse, d_out, d_lse)
