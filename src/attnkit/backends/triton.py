"""The ``"triton"`` backend: Triton GPU kernels (CPU tensors under ``TRITON_INTERPRET=1``).
Nothing here imports Triton: the kernel module does, when a kernel first runs."""

from __future__ import annotations

from typing import Optional

from ..kernels.triton_launch import TRITON_SCORE_MODS, triton_available, triton_grad_share, triton_kernel, triton_takes
from .base import Backend, Problem, tiled_grad_share, with_parameters


class TritonBackend(Backend):
    name = "triton"
    description = "Triton GPU kernels (CUDA; CPU under TRITON_INTERPRET=1); auto's choice on CUDA"
    score_mods = TRITON_SCORE_MODS

    def accepts(self, problem):
        reason = self.takes_arguments(problem)
        return reason if reason is not None else triton_available(problem.device)

    def kernels_take(self, problem: Problem) -> Optional[str]:
        """None when the kernels themselves run the problem (else the sparse backend stands in
        for them: float64, head dims over the limit), or why not."""
        return triton_takes(problem.device, problem.dtype, problem.head_dim, problem.value_dim)

    def forward(self, problem, q, k, v):
        return triton_kernel(q, k, v, problem.pattern, problem.scale, problem.score_mod)

    def grad_share(self, problem, q, k, v, out, lse, d_out, d_lse):
        if self.kernels_take(problem) is not None or problem.batch == 0:  # what the sparse backend stands in for
            return tiled_grad_share(problem, q, k, v, out, lse, d_out, d_lse)
        *grads, d_parameter = triton_grad_share(q, k, v, out, lse, d_out, d_lse, problem.pattern, problem.scale,
                                                problem.score_mod)
        if d_parameter is not None:
            d_parameter = d_parameter.to(problem.parameters()[0].dtype)
        return with_parameters(problem, grads, d_parameter)
