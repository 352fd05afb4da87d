"""The ``"blockwise"`` backend: tiled online softmax that skips empty tiles; takes explicit positions."""

from __future__ import annotations

import math

from ..kernels.blockwise import blockwise_kernel, plan_tiles, tile_pairs
from .base import Backend, tiled_grad_share
from .facts import documents_with_score_mod, full_or_causal, planned


class BlockwiseBackend(Backend):
    name = "blockwise"
    description = "tiled online softmax (FlashAttention-style), skips empty tiles; explicit positions, padding"
    takes_positions = True
    takes_padding = True
    score_mods = ("softcap", "alibi", "distance_bias")

    def cost(self, problem):
        bottom_right = problem.positions is None
        # The sparse planner's patterns: it computes fewer pairs, but it takes no padding mask.
        if bottom_right and problem.key_padding_mask is None and planned(problem) and not documents_with_score_mod(problem):
            return math.inf
        if bottom_right and full_or_causal(problem):  # tiles cover at least half of the square
            return float(problem.square)
        return float(tile_pairs(_tiles(problem)) * problem.n_q_heads)

    def forward(self, problem, q, k, v):
        return blockwise_kernel(q, k, v, problem.pattern, problem.scale, positions=problem.positions,
                                key_padding_mask=problem.key_padding_mask, blocks=_tiles(problem),
                                score_mod=problem.score_mod)

    def grad_share(self, problem, q, k, v, out, lse, d_out, d_lse):
        return tiled_grad_share(problem, q, k, v, out, lse, d_out, d_lse)


def _tiles(problem) -> list:
    """The kernel's tile plan for ``problem``, made once per call: ``auto`` costs it and the kernel
    runs it (plans for explicit positions are not cached across calls and take as long as a
    large call's arithmetic)."""
    if problem.memo is None:
        problem.memo = {}
    if "tiles" not in problem.memo:
        problem.memo["tiles"] = plan_tiles(problem.pattern, problem.n_q, problem.n_k, positions=problem.positions)
    return problem.memo["tiles"]
