"""The ``"sparse"`` backend: the sparse planner (work in proportion to the allowed pairs), and the
native band kernel for finite bands where it runs."""

from __future__ import annotations

import math

from ..kernels.sparse import sparse_kernel, sparse_plan_pairs
from . import native_band
from .base import Backend, tiled_grad_share
from .facts import planned


class SparseBackend(Backend):
    name = "sparse"
    description = "the sparse planner (work follows the allowed pairs) and the native band kernel"

    def cost(self, problem):
        if native_band.runs(problem):
            return native_band.cost(problem)
        if planned(problem):
            return float(sparse_plan_pairs(problem.pattern, problem.n_q, problem.n_k, problem.n_q_heads))
        return math.inf

    def forward(self, problem, q, k, v):
        return sparse_kernel(q, k, v, problem.pattern, problem.scale)

    def grad_share(self, problem, q, k, v, out, lse, d_out, d_lse):
        if native_band.runs(problem):
            return native_band.grad_share(problem, q, k, v, out, lse, d_out, d_lse)
        # The planner's fused backward takes no LSE gradient: the blockwise kernel's share (exact).
        return tiled_grad_share(problem, q, k, v, out, lse, d_out, d_lse)
