"""Facts about a problem's pattern that several backends' costs ask for, derived once per call."""

from __future__ import annotations

from ..kernels.band_native import finite_band
from ..kernels.dense import fused_lse_available
from ..kernels.sparse import head_runs
from ..patterns import BlockLocal, BlockSparse, Fixed, Pattern, Periodic, Strided, Summary, Union
from .base import Problem

_PLANNED = (Strided, Fixed, Periodic, BlockLocal, Summary, BlockSparse)  # patterns the sparse planner is for


def finite_bands(problem: Problem) -> bool:
    """Whether every head's pattern is a band with finite bounds (the native band kernel's work)."""
    return problem.fact("finite_bands", lambda: all(
        finite_band(p) is not None for _, _, p in head_runs(problem.pattern, problem.n_q_heads, 1)
    ))


def planned(problem: Problem) -> bool:
    """Whether every head's pattern is a sparse pattern, a finite band, or a union of those: what
    the sparse planner is for."""
    def planned_one(p: Pattern) -> bool:
        if p.band() is not None:
            return finite_band(p) is not None
        if isinstance(p, _PLANNED):
            return True
        return isinstance(p, Union) and planned_one(p.left) and planned_one(p.right)

    return problem.fact("planned", lambda: all(
        planned_one(p) for _, _, p in head_runs(problem.pattern, problem.n_q_heads, 1)
    ))


def full_or_causal(problem: Problem) -> bool:
    """Whether the pattern is Full or Causal for every head (SDPA runs them without a mask)."""
    pattern = problem.pattern
    band = pattern.band() if pattern.n_heads is None else None
    return band is not None and band[1] == float("inf") and band[0] in (0, -float("inf"))


def lse_needs_second_pass(problem: Problem) -> bool:
    """Whether SDPA cannot give the LSE asked for from the same fused call (off the CPU, or a
    value width unlike the key width)."""
    return problem.need_lse and not fused_lse_available(problem.device, problem.head_dim, problem.value_dim)
