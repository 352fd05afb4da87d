"""The one place where sequence-parallel schemes compute on this rank: public dispatch and ``grad_share``.

Every scheme (ring steps, Ulysses' whole-sequence call, the hybrid's ring) computes a part of
attention here: :func:`part_forward` through the public :func:`attnkit.attention` (its NaN rule
included), :func:`part_grads` through the backend's ``grad_share`` given the merged LSE. Nothing
per part is stored between the two: the backward recomputes from ``out`` and ``lse``. The NaN
rule of the public dispatch holds across parts: the forward marks the rows that may see a
non-finite key in any part (:func:`seeing_nonfinite`), and the backward cuts them
(:func:`without_rows`) and counts non-finite entries as zero, as the one-device rerun does.
``grad_share`` returns :class:`~attnkit.backends.base.Grads`: ``(dq, dk, dv)`` and the gradients
of the call's parameters (a score mod's slopes or table), which :func:`part_grads` passes on.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from ..backends import BY_NAME, make_problem, pick
from ..backends.base import Grads
from ..functional import attention
from ..kernels.common import all_finite, nonfinite_keys, rows_seeing
from ..patterns import Pattern
from .comm import RingStats

Positions = Optional[tuple[torch.Tensor, torch.Tensor]]

_SQUARE_SHARES = ("dense", "reference")
"""Backends whose ``grad_share`` builds the ``Nq x Nk`` weights: a whole-sequence backward takes
the blockwise share instead (exact for the same problem, a few tiles of memory)."""


def timed(stats: Optional[RingStats], fn, *args):
    """``fn(*args)``, its wall and CPU time added to ``stats`` (CUDA synchronised around it)."""
    if stats is None:
        return fn(*args)
    if args[0].is_cuda:
        torch.cuda.synchronize(args[0].device)
    start, cpu_start = time.perf_counter(), time.thread_time()
    result = fn(*args)
    if args[0].is_cuda:
        torch.cuda.synchronize(args[0].device)
    stats.compute_s += time.perf_counter() - start
    stats.compute_cpu_s += time.thread_time() - cpu_start
    return result


def part_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, scale: float, backend: str,
    positions: Positions = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, Hq, Nq, Dv), lse (B, Hq, Nq))`` of ``q`` against the keys ``k``/``v``, at
    ``positions = (q_pos, k_pos)`` (None: one whole sequence, bottom-right aligned)."""
    q_pos, k_pos = positions if positions is not None else (None, None)
    with torch.no_grad():
        return attention(q, k, v, pattern, scale=scale, backend=backend, return_lse=True,
                         q_positions=q_pos, k_positions=k_pos)


def seeing_nonfinite(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, positions: Positions = None
) -> Optional[torch.Tensor]:
    """``(B, Hq, Nq)`` bool: the rows of ``q`` that may see a NaN or inf in ``k`` or ``v``; None when
    there is none. Such rows keep their own (non-finite) output and pass no gradient back (the
    rule of :func:`attnkit.attention`): see :func:`without_rows`."""
    if all_finite(k) and all_finite(v):
        return None
    return rows_seeing(pattern, nonfinite_keys(k, v), q.shape[1], q.shape[2], positions)


def joined(cut: Optional[torch.Tensor], more: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The union of two row masks of :func:`seeing_nonfinite` (either may be None)."""
    return more if cut is None else cut if more is None else cut | more


def without_rows(cut: Optional[torch.Tensor], out, lse, d_out, d_lse):
    """``(out, lse, d_out, d_lse)`` for a backward in which the rows of ``cut (B, Hq, Nq)`` pass no
    gradient: their output gradients are zero, and their output and LSE are set so that their
    probabilities are zero (LSE ``+inf``) and no NaN of theirs enters the arithmetic."""
    if cut is None:
        return out, lse, d_out, d_lse
    rows = cut.unsqueeze(-1)
    d_lse = None if d_lse is None else d_lse.masked_fill(cut, 0)
    return out.masked_fill(rows, 0), lse.masked_fill(cut, float("inf")), d_out.masked_fill(rows, 0), d_lse


def part_grads(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    d_out: torch.Tensor, d_lse: Optional[torch.Tensor], pattern: Pattern, scale: float, backend: str,
    positions: Positions = None,
) -> Grads:
    """``(dq, dk, dv, params)`` (:class:`~attnkit.backends.base.Grads`; ``params`` is empty: no
    score mod reaches this rank's parts yet): the share of the gradients through the keys ``k``/``v`` when ``out`` and
    ``lse`` are the results over the whole key set (which may be just these keys), rows that may
    see a non-finite key anywhere already cut (:func:`without_rows`); non-finite entries of ``k``
    and ``v`` count as zero, as in :func:`attnkit.attention`'s rerun. ``backend``
    ``"auto"`` takes the share of the backend ``auto`` runs for the problem, or the blockwise one
    where that share would build the ``Nq x Nk`` weights."""
    q_pos, k_pos = positions if positions is not None else (None, None)
    if not (all_finite(k) and all_finite(v)):  # rows that see them are cut (without_rows)
        zero = torch.zeros((), dtype=k.dtype, device=k.device)
        k, v = torch.where(torch.isfinite(k), k, zero), torch.where(torch.isfinite(v), v, zero)
    problem = make_problem(q, k, v, pattern, scale, True, q_pos, k_pos)
    if backend == "auto":
        runner = pick(problem)
        runner = BY_NAME["blockwise"] if runner.name in _SQUARE_SHARES else runner
    else:
        runner = BY_NAME[backend]
    with torch.no_grad():
        return runner.grad_share(problem, q, k, v, out, lse, d_out, d_lse)


__all__ = ["joined", "part_forward", "part_grads", "seeing_nonfinite", "timed", "without_rows"]
