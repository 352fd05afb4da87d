"""Facts about a problem's pattern that several backends' costs ask for, derived once per call."""

from __future__ import annotations

from ..kernels.dense import fused_lse_available
from ..kernels.sparse_plan import document_piece
from ..patterns import finite_band, head_runs, shared_band
from .base import Problem


def finite_bands(problem: Problem) -> bool:
    """Whether every head's pattern is a band with finite bounds (the native band kernel's work)."""
    return _head_facts(problem)[0]


def planned(problem: Problem) -> bool:
    """Whether every head's pattern has a planned decomposition (``Pattern.parts``): what the
    sparse planner is for."""
    return _head_facts(problem)[1]


def _head_facts(problem: Problem) -> tuple[bool, bool]:
    """``(finite_bands, planned)`` from one pass over the heads' patterns, once per problem (auto
    asks several backends; this is on every call's path, so it is kept flat)."""
    memo = problem.memo
    if memo is None:
        memo = problem.memo = {}
    facts = memo.get("heads")
    if facts is None and problem.pattern.n_heads is None:
        pattern = problem.pattern
        facts = memo["heads"] = (finite_band(pattern) is not None, pattern.parts is not None)
    elif facts is None:
        patterns = [p for _, _, p in head_runs(problem.pattern, problem.n_q_heads, 1)]
        facts = memo["heads"] = (
            all(finite_band(p) is not None for p in patterns), all(p.parts is not None for p in patterns)
        )
    return facts


def full_or_causal(problem: Problem) -> bool:
    """Whether the pattern is Full or Causal for every head (SDPA runs them without a mask)."""
    pattern = problem.pattern
    band = shared_band(pattern)
    return band is not None and band[1] == float("inf") and band[0] in (0, -float("inf"))


def lse_needs_second_pass(problem: Problem) -> bool:
    """Whether SDPA cannot give the LSE asked for from the same fused call (off the CPU, or a
    value width unlike the key width)."""
    return problem.need_lse and not fused_lse_available(problem.device, problem.head_dim, problem.value_dim)


def documents_with_score_mod(problem: Problem) -> bool:
    """Whether the call modifies scores and some head's pattern is cut into documents: the sparse
    backend's document kernel applies no score mod, so such calls go to blockwise."""
    if problem.score_mod is None:
        return False
    return any(document_piece(p) is not None for _, _, p in head_runs(problem.pattern, problem.n_q_heads, 1))
