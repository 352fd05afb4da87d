"""What ``backend="auto"`` runs: a small policy over the registry.

1. On CUDA, the Triton kernels, for every pattern but Full and Causal (which stay on SDPA's fused
   kernels), when they take the inputs.
2. Otherwise the cheapest backend by :meth:`~.base.Backend.cost` among those that accept the call
   (on equal cost the earlier in the registry). The costs are in score entries, SDPA's counted
   at half (dense runs the square, fused; the planned kernels win below half of it):

   - dense: half the square, or infinite when the LSE is asked for where SDPA cannot return it
     from the same call; refused when its mask would exceed a quarter of the free memory;
   - sparse: for finite bands where the native band kernel runs, a quarter of the square from 32
     queries on (it beat masked SDPA at every window measured), else the allowed pairs; for the
     planner's patterns (Strided, Fixed, BlockSparse, their parts, unions of these) the pairs its
     plan computes; infinite for other patterns;
   - blockwise: the pairs its tiles cover; infinite for the planner's patterns;
   - reference and triton: no cost of their own (never picked by cost).
3. When no accepting backend has a finite cost, the reference backend, unless its weights would
   exceed a quarter of the free memory (then a ValueError says so). Blockwise takes positions and
   padding at a finite cost, so the reference backend is the last resort only for calls it can hold.

Explicit positions or a key padding mask narrow the field to the backends that take them.
"""

from __future__ import annotations

import math

import torch

from ..patterns import Pattern
from .base import Backend, Problem
from .facts import full_or_causal
from .registry import BY_NAME, REGISTRY


_COSTED = tuple(backend for backend in REGISTRY if type(backend).cost is not Backend.cost)
"""The backends with a cost of their own: the others are never picked by cost."""


def pick(problem: Problem) -> Backend:
    """The backend ``auto`` runs for ``problem`` (see the module docstring)."""
    triton = BY_NAME["triton"]
    if (
        problem.device.type == "cuda" and not full_or_causal(problem)
        and triton.accepts(problem) is None and triton.kernels_take(problem) is None
    ):
        return triton
    best = BY_NAME["reference"]
    explicit = problem.positions is not None or problem.key_padding_mask is not None
    # The costs first; the full acceptance check (free memory for a mask, say) then runs in cost
    # order, on equal cost in registry order (a stable sort), only until one backend accepts.
    costed = [
        (backend.cost(problem), backend) for backend in _COSTED
        if not explicit or backend.takes_arguments(problem) is None
    ]
    costed.sort(key=lambda entry: entry[0])
    for cost, backend in costed:
        if cost == math.inf:
            break
        if backend.accepts(problem) is None:
            best = backend
            break
    if best.name == "reference":
        reason = best.accepts(problem)
        if reason is not None:
            raise ValueError(f"backend 'auto' found no backend for this call: 'reference' refuses: {reason}")
    return best


def choose_backend(
    pattern: Pattern,
    n_q: int,
    n_k: int,
    device: torch.device,
    need_lse: bool,
    n_q_heads: int = 1,
    *,
    head_dim: int = 64,
    value_dim: int = 64,
    native_band: bool = False,
    dtype: torch.dtype = torch.float32,
    scale: float = 1.0,
) -> str:
    """The name of the backend ``auto`` runs for a problem described by its sizes; ``native_band``
    says whether bands run the native band kernel (``attention()`` lets the sparse backend
    decide). On a CUDA ``device`` the answer is ``"triton"`` for every pattern but Full and Causal
    when the Triton kernels take the problem (step 1 of the module docstring)."""
    problem = Problem(
        pattern, n_q, n_k, n_q_heads, head_dim, value_dim, device=device, dtype=dtype,
        scale=scale, need_lse=need_lse, native_band=native_band,
    )
    return pick(problem).name
