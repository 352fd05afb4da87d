"""The one place where sequence-parallel schemes compute on this rank: public dispatch and ``grad_share``.

Every scheme (ring steps, Ulysses' whole-sequence call, the hybrid's ring) computes a part of
attention here: :func:`part_forward` through the public :func:`attnkit.attention` (its NaN rule
included), :func:`part_grads` through the backend's ``grad_share`` given the merged LSE. Nothing
per part is stored between the two: the backward recomputes from ``out`` and ``lse``. Should
``grad_share`` return more (parameter gradients of score modifications), this module is what
changes.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from ..backends import BY_NAME, make_problem, pick
from ..functional import attention
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


def part_grads(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    d_out: torch.Tensor, d_lse: Optional[torch.Tensor], pattern: Pattern, scale: float, backend: str,
    positions: Positions = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)``: the share of the gradients through the keys ``k``/``v`` when ``out`` and
    ``lse`` are the results over the whole key set (which may be just these keys). ``backend``
    ``"auto"`` takes the share of the backend ``auto`` runs for the problem, or the blockwise one
    where that share would build the ``Nq x Nk`` weights."""
    q_pos, k_pos = positions if positions is not None else (None, None)
    problem = make_problem(q, k, v, pattern, scale, True, q_pos, k_pos)
    if backend == "auto":
        runner = pick(problem)
        runner = BY_NAME["blockwise"] if runner.name in _SQUARE_SHARES else runner
    else:
        runner = BY_NAME[backend]
    with torch.no_grad():
        return runner.grad_share(problem, q, k, v, out, lse, d_out, d_lse)


__all__ = ["part_forward", "part_grads", "timed"]
