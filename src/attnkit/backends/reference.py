"""The ``"reference"`` backend: the explicit two steps, for checking and explaining; ``auto``
never picks it unless no other backend takes the call."""

from __future__ import annotations

from ..kernels.common import compute_dtype
from ..kernels.dense import free_memory_short
from ..kernels.reference import reference_kernel
from ..kernels.score_mods import KINDS
from .base import Backend, explicit_grad_share


class ReferenceBackend(Backend):
    name = "reference"
    description = "explicit two-step math (scores, softmax, weights @ v); materialises the Nq x Nk weights"
    takes_positions = True
    takes_padding = True
    score_mods = KINDS

    def accepts(self, problem):
        reason = self.takes_arguments(problem)
        if reason is not None:
            return reason
        # The (B, Hq, Nq, Nk) weights, as for dense's mask: refuse rather than run out of memory.
        needed = problem.batch * problem.square * compute_dtype(problem.dtype).itemsize
        free = free_memory_short(needed, problem.device)
        if free is None:
            return None
        return (
            f"its {needed / 2**30:.2f} GiB of weights would exceed a quarter of the "
            f"{free / 2**30:.2f} GiB free on {problem.device}; use backend='blockwise'"
        )

    def forward(self, problem, q, k, v):
        out, lse, _ = reference_kernel(
            q, k, v, problem.pattern, problem.scale,
            positions=problem.positions, key_padding_mask=problem.key_padding_mask, score_mod=problem.score_mod,
        )
        return out, lse

    def grad_share(self, problem, q, k, v, out, lse, d_out, d_lse):
        return explicit_grad_share(problem, q, k, v, out, lse, d_out, d_lse)
