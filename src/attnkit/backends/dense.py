"""The ``"dense"`` backend: torch SDPA, fused for Full and causal, with a mask otherwise.

Score mods: alibi and distance_bias enter SDPA as a float mask; a Python callable runs as
explicit scores (the reference kernel: SDPA cannot call it); softcap is refused (SDPA cannot
express it) and ``auto`` takes another backend."""

from __future__ import annotations

import math

from ..kernels.common import LOW_PRECISION
from ..kernels.dense import dense_kernel, dense_misfit, free_memory_short
from ..kernels.reference import reference_kernel
from .base import Backend, explicit_grad_share
from .facts import lse_needs_second_pass

SDPA_PAIR_COST = 0.5
"""SDPA's cost per score entry relative to the planned kernels' (sparse, blockwise): they win
only when they compute less than half of the square."""


class DenseBackend(Backend):
    name = "dense"
    description = "torch scaled_dot_product_attention: fused for full/causal, an Nq x Nk mask otherwise"
    takes_positions = True
    takes_padding = True
    score_mods = ("alibi", "distance_bias", "callable")

    def accepts(self, problem):
        reason = self.takes_arguments(problem)
        if reason is not None:
            return reason
        padded = problem.key_padding_mask is not None
        if problem.score_mod is not None and problem.score_mod.additive and problem.dtype in LOW_PRECISION:
            return f"its float mask would round the score_mod's bias to {problem.dtype}"
        if problem.score_mod is not None:  # a float (1 or B, Hq, Nq, Nk) mask or weights, and a bool one
            needed = (problem.batch if padded else 1) * problem.square * (1 + problem.dtype.itemsize)
            free = free_memory_short(needed, problem.device)
            if free is not None:
                return (f"its {needed / 2**30:.2f} GiB score mask would exceed a quarter of the "
                        f"{free / 2**30:.2f} GiB free on {problem.device}; use backend='blockwise'")
        return dense_misfit(
            problem.pattern, problem.n_q, problem.n_k, problem.device, problem.dtype, problem.scale,
            explicit=padded or problem.positions is not None, padded_batch=problem.batch if padded else 1,
        )

    def cost(self, problem):
        if problem.score_mod is not None and problem.score_mod.kind == "callable":
            return math.inf  # explicit scores: auto falls back to the reference backend, the same math
        if lse_needs_second_pass(problem) or (problem.need_lse and problem.score_mod is not None):  # the LSE would cost a blockwise pass on top
            return math.inf
        return SDPA_PAIR_COST * problem.square

    def forward(self, problem, q, k, v):
        if problem.score_mod is not None and problem.score_mod.kind == "callable":
            out, lse, _ = reference_kernel(
                q, k, v, problem.pattern, problem.scale, positions=problem.positions,
                key_padding_mask=problem.key_padding_mask, score_mod=problem.score_mod,
            )
            return out, lse
        return dense_kernel(
            q, k, v, problem.pattern, problem.scale, problem.need_lse,
            positions=problem.positions, key_padding_mask=problem.key_padding_mask, memory_checked=True,
            score_mod=problem.score_mod,
        )

    def grad_share(self, problem, q, k, v, out, lse, d_out, d_lse):
        # SDPA's backward cannot be given a merged LSE: the explicit formula over the same mask.
        return explicit_grad_share(problem, q, k, v, out, lse, d_out, d_lse)
