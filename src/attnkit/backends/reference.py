"""The ``"reference"`` backend: the explicit two steps, for checking and explaining; ``auto``
never picks it unless no other backend takes the call."""

from __future__ import annotations

from ..kernels.common import allowed_mask, kv_groups
from ..kernels.reference import explicit_grads, reference_kernel
from .base import Backend


class ReferenceBackend(Backend):
    name = "reference"
    description = "explicit two-step math (scores, softmax, weights @ v); materialises the Nq x Nk weights"
    takes_positions = True
    takes_padding = True

    def forward(self, problem, q, k, v):
        out, lse, _ = reference_kernel(
            q, k, v, problem.pattern, problem.scale,
            positions=problem.positions, key_padding_mask=problem.key_padding_mask,
        )
        return out, lse

    def grad_share(self, problem, q, k, v, out, lse, d_out, d_lse):
        allowed = allowed_mask(problem.pattern, q.shape[2], k.shape[2], q.device, kv_groups(q, k),
                               problem.positions, problem.key_padding_mask)
        return explicit_grads(q, k, v, out, lse, d_out, d_lse, allowed, problem.scale)
