"""The ``"dense"`` backend: torch SDPA, fused for Full and causal, with a mask otherwise."""

from __future__ import annotations

import math

from ..kernels.dense import dense_kernel, dense_misfit
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

    def accepts(self, problem):
        reason = self.takes_arguments(problem)
        if reason is not None:
            return reason
        padded = problem.key_padding_mask is not None
        return dense_misfit(
            problem.pattern, problem.n_q, problem.n_k, problem.device, problem.dtype, problem.scale,
            explicit=padded or problem.positions is not None, padded_batch=problem.batch if padded else 1,
        )

    def cost(self, problem):
        if lse_needs_second_pass(problem):  # the LSE would cost a blockwise pass on top
            return math.inf
        return SDPA_PAIR_COST * problem.square

    def forward(self, problem, q, k, v):
        return dense_kernel(
            q, k, v, problem.pattern, problem.scale, problem.need_lse,
            positions=problem.positions, key_padding_mask=problem.key_padding_mask, memory_checked=True,
        )

    def grad_share(self, problem, q, k, v, out, lse, d_out, d_lse):
        # SDPA's backward cannot be given a merged LSE: the explicit formula over the same mask.
        return explicit_grad_share(problem, q, k, v, out, lse, d_out, d_lse)
