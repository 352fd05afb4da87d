"""DeepSpeed-Ulysses and the Ulysses x ring hybrid over ``torch.distributed``, beside the ring.

**Ulysses** (Jacobs et al. 2023): each rank holds a sequence shard of every head; an all-to-all
(:mod:`.exchange`) turns it into a head shard of the whole sequence; each rank runs ordinary
attention (the public :func:`attnkit.attention`, any backend, any pattern) on whole sequences for
its heads; a second all-to-all turns the output back into sequence shards. Its degree is capped
by the number of query heads; KV heads fewer than the degree are replicated and head counts the
degree does not divide are split unevenly (see :mod:`.heads`).

**Hybrid** (USP, Fang and Zhao 2024): the ranks form a ``U x R`` grid (:mod:`.grid`). The
all-to-all runs inside each Ulysses group of ``U`` ranks, which then hold the group's tokens for
their heads; ring attention runs across the ``R`` groups for those heads, on the tokens each
group holds (so the ring's step skipping and load balance carry over); the all-to-all turns the
result back. ``U = 1`` is the ring, ``R = 1`` is Ulysses.

Both are one autograd function: the forward keeps the head shards of q, k, v, out and LSE of each
round; the backward sends the output gradient to heads, takes the gradients through the
backends' ``grad_share`` (:mod:`.local`; the ring's backward for the hybrid), and sends dQ, dK, dV
back, summing replicated KV heads. Rank ``w`` of the scheme holds shard ``w`` of the layout
(:func:`.layouts.shard`), as for the ring, so a model switches schemes without resharding.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..checks import check_sinks
from ..kernels.common import compute_dtype
from ..kernels.sinks import with_sinks
from ..patterns import Pattern
from .agreement import HYBRID, ULYSSES, check_same_everywhere, checked_arguments
from .comm import DEFAULT_TIMEOUT_S, RingComm, RingStats, current_stats
from .exchange import HeadExchange
from .heads import HeadSplit, heads_of, plan_rounds, split_heads
from .layouts import check_split, group_positions
from .local import part_forward, part_grads, seeing_nonfinite, timed, without_rows
from .ring import RingCore, ring_positions

ROUND_BYTES = 256 * 2**20
"""Bytes of gathered q, k and v a round aims at: bigger problems exchange and compute a few KV
heads at a time, which bounds the head shards in flight without changing any result."""


class LocalCore:
    """Attention on this rank over the whole sequence (Ulysses): the public dispatch forward,
    ``grad_share`` backward."""

    def __init__(self, scale: float, stats: Optional[RingStats]):
        self.scale, self.stats = scale, stats

    def forward(self, q, k, v, pattern: Pattern):
        """``(out, lse, cut)``: ``cut`` marks the rows that may see a non-finite key (or None)."""
        out, lse = timed(self.stats, lambda *a: part_forward(*a, pattern, self.scale, "auto"), q, k, v)
        return out, lse, seeing_nonfinite(q, k, v, pattern)

    def backward(self, q, k, v, out, lse, cut, d_out, d_lse, pattern: Pattern):
        out, lse, d_out, d_lse = without_rows(cut, out, lse, d_out, d_lse)
        return timed(self.stats, lambda *a: part_grads(*a, pattern, self.scale, "auto"),
                     q, k, v, out, lse, d_out, d_lse)


class _Call:
    """One Ulysses or hybrid call: the exchange, its rounds, the core and the per-round patterns."""

    def __init__(self, exchange: HeadExchange, split: HeadSplit, rounds: list[HeadSplit], core, pattern: Pattern,
                 return_lse: bool):
        self.exchange, self.rounds, self.core, self.return_lse = exchange, rounds, core, return_lse
        me = exchange.comm.rank
        self.patterns = [heads_of(pattern, *r.q[me]) for r in rounds]
        self.replicated = any(a[1] > b[0] for a, b in zip(split.kv, split.kv[1:]))
        """Whether a KV head goes to several ranks (its gradient copies are then summed)."""


class _SequenceParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, call: _Call):
        ctx.set_materialize_grads(False)
        exchange, me = call.exchange, call.exchange.comm.rank
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = torch.empty(q.shape[:-1], dtype=compute_dtype(q.dtype), device=q.device) if call.return_lse else None
        saved = []
        for i, (part, pattern) in enumerate(zip(call.rounds, call.patterns)):
            q_h = exchange.to_heads(q, part.q, f"round {i} queries to heads")
            k_h = exchange.to_heads(k, part.kv, f"round {i} keys to heads")
            v_h = exchange.to_heads(v, part.kv, f"round {i} values to heads")
            if q_h.shape[1]:
                out_h, lse_h, cut_h = call.core.forward(q_h, k_h, v_h, pattern)
            else:  # this rank has no head in this round: it only forwards others' tokens
                out_h, lse_h, cut_h = q_h.new_empty(*q_h.shape[:-1], v.shape[-1]), q_h.new_empty(q_h.shape[:-1]), None
            exchange.to_sequence(out_h, part.q, out, f"round {i} output to tokens")
            if lse is not None:
                exchange.to_sequence(lse_h, part.q, lse, f"round {i} LSE to tokens")
            saved.append((q_h, k_h, v_h, out_h, lse_h, cut_h))
            del q_h, k_h, v_h, out_h, lse_h, cut_h
        # Kept on ctx rather than saved for backward: they are internal (no cycle through the
        # outputs), and the backward drops each round's tensors as soon as it is done with them.
        ctx.call, ctx.saved, ctx.shapes = call, saved, (q.shape, k.shape, v.shape)
        return out, (lse if lse is not None else out.new_empty(0))

    @staticmethod
    def backward(ctx, d_out, d_lse):
        call, exchange = ctx.call, ctx.call.exchange
        q_shape, k_shape, v_shape = ctx.shapes
        dtype, device = ctx.saved[0][0].dtype, ctx.saved[0][0].device
        d_q = torch.empty(q_shape, dtype=dtype, device=device)
        # Copies of a replicated KV head add up (in float32 for half inputs); otherwise each
        # KV head arrives once and is written in place, so no page is touched before it comes.
        make, grad_dtype = (torch.zeros, compute_dtype(dtype)) if call.replicated else (torch.empty, dtype)
        d_k = make(k_shape, dtype=grad_dtype, device=device)
        d_v = make(v_shape, dtype=grad_dtype, device=device)
        if d_out is None:  # only the LSE was used
            d_out = torch.zeros((*q_shape[:-1], v_shape[-1]), dtype=dtype, device=device)
        d_lse = d_lse if call.return_lse else None
        for i, (part, pattern) in enumerate(zip(call.rounds, call.patterns)):
            q_h, k_h, v_h, out_h, lse_h, cut_h = ctx.saved[i]
            ctx.saved[i] = None
            d_out_h = exchange.to_heads(d_out, part.q, f"backward round {i} output gradient to heads")
            d_lse_h = None if d_lse is None else exchange.to_heads(d_lse, part.q, f"backward round {i} LSE gradient to heads")
            if q_h.shape[1]:
                grads = call.core.backward(q_h, k_h, v_h, out_h, lse_h, cut_h, d_out_h, d_lse_h, pattern)
            else:
                grads = (q_h, k_h, v_h)  # empty
            del q_h, k_h, v_h, out_h, lse_h, cut_h, d_out_h, d_lse_h
            # Gradients travel in the input dtype; copies of a replicated KV head add up in d_k / d_v.
            d_q_h, d_k_h, d_v_h = (g.to(dtype) for g in grads[:3])  # no parameters: no score mod here
            del grads
            exchange.to_sequence(d_q_h, part.q, d_q, f"backward round {i} dQ to tokens")
            exchange.to_sequence(d_k_h, part.kv, d_k, f"backward round {i} dK to tokens", add=call.replicated)
            exchange.to_sequence(d_v_h, part.kv, d_v, f"backward round {i} dV to tokens", add=call.replicated)
        return d_q, d_k.to(dtype), d_v.to(dtype), None


def _group_ranks(group: Optional[dist.ProcessGroup]) -> set[int]:
    return set(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))


def _sequence_parallel(
    caller: str, q, k, v, pattern, ulysses_group, ring_group, layout, scale, return_lse, timeout, hybrid: bool,
    sinks=None,
):
    stats = current_stats()
    u_comm = RingComm(ulysses_group, timeout, stats)
    r_comm = RingComm(ring_group, timeout, stats) if hybrid else None
    grid = (u_comm.size, r_comm.size if hybrid else 1)
    pattern, scale, problem = checked_arguments(q, k, v, pattern, layout, scale)
    if problem is None:
        try:
            split = split_heads(q.shape[1], k.shape[1], u_comm.size)
            if hybrid and _group_ranks(ulysses_group) & _group_ranks(ring_group) != {dist.get_rank()}:
                raise ValueError(
                    f"{caller}: ulysses_group and ring_group must meet in this rank only (a grid, see "
                    f"make_grid); rank {dist.get_rank()} finds {sorted(_group_ranks(ulysses_group) & _group_ranks(ring_group))}"
                )
        except ValueError as exc:
            problem = exc
    check_same_everywhere([u_comm] + ([r_comm] if hybrid else []), q, k, v, pattern, layout, scale, problem,
                          caller=caller, scheme=HYBRID if hybrid else ULYSSES, grid=grid)
    world = grid[0] * grid[1]
    seq_len = q.shape[2] * world
    check_split(seq_len, layout, world)
    exchange = HeadExchange(u_comm, group_positions(seq_len, layout, grid[0], r_comm.rank if hybrid else 0, world,
                                                     device=q.device))
    if grid[1] == 1:
        core = LocalCore(scale, stats)
    else:
        core = RingCore(r_comm, ring_positions(seq_len, layout, grid[0], world, device=q.device), scale)
    groups = q.shape[1] // k.shape[1]
    per_kv_head = q.shape[0] * seq_len / grid[1] * (groups * q.shape[3] + k.shape[3] + v.shape[3]) * q.element_size()
    rounds = plan_rounds(split, groups, max(1, int(ROUND_BYTES // per_kv_head)))
    if stats is not None:
        stats.calls += 1
    need_lse = return_lse or sinks is not None
    out, lse = _SequenceParallel.apply(q, k, v, _Call(exchange, split, rounds, core, pattern, need_lse))
    if sinks is not None:  # every rank holds all heads of its tokens again: joined once, here
        out, lse = with_sinks(out, lse, check_sinks(sinks, q.shape[1], q.dtype, q.device))
    return (out, lse) if return_lse else out


_SHARED_ARGS = """
        q: ``(B, Hq, N/P, D)`` this rank's queries, shard ``rank`` of ``layout`` (as for the ring).
        k: ``(B, Hkv, N/P, D)`` this rank's keys (``Hq % Hkv == 0``).
        v: ``(B, Hkv, N/P, Dv)`` this rank's values.
        pattern: which keys each query may see, at global positions (default Full); any pattern,
            per-head patterns included."""

_SHARED_TAIL = """
        layout: ``"contiguous"``, ``"zigzag"`` or ``"striped"`` (see :mod:`.layouts`).
        scale: multiplier of ``q @ k^T``; default ``1 / sqrt(D)``.
        return_lse: also return this shard's log-sum-exp ``(B, Hq, N/P)`` (float32 for half inputs).
        timeout: seconds any transfer may wait for a peer before a ``RuntimeError``.
        sinks: ``(Hq,)`` attention sinks as in :func:`attnkit.attention`, the same on every rank
            (a layer's parameter); joined once, to each row's final LSE.
    Returns:
        ``out (B, Hq, N/P, Dv)``, or ``(out, lse)``: this rank's shard of what
        :func:`attnkit.attention` gives on the full tensors. Differentiable in q, k, v (and sinks).
    Raises:
        ValueError / TypeError: bad local input (as :func:`attnkit.attention`), an unknown layout,
            a pattern that does not fit the sequence, a shard length the layout cannot split, more
            Ulysses ranks than query heads, or ranks that disagree (shapes, dtypes, layout, scale,
            pattern, scheme, grid); raised on every rank (see :mod:`.agreement`).
        RuntimeError: torch.distributed not initialised, a peer that does not answer in time, or
            a lost connection; the message names this rank, the peer and the phase.
    """


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Optional[Pattern] = None,
    *,
    group: Optional[dist.ProcessGroup] = None,
    layout: str = "zigzag",
    scale: Optional[float] = None,
    return_lse: bool = False,
    timeout: float = DEFAULT_TIMEOUT_S,
    sinks: Optional[torch.Tensor] = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    return _sequence_parallel("ulysses_attention", q, k, v, pattern, group, None, layout, scale, return_lse,
                              timeout, hybrid=False, sinks=sinks)


ulysses_attention.__doc__ = f"""Exact attention over a sequence sharded across ``group``, by Ulysses' all-to-all over heads.

    Every rank calls it with its own shard; each computes whole sequences for a range of heads
    (``P <= Hq``; uneven when ``P`` does not divide the heads; KV heads replicated when
    ``Hkv < P``).

    Args:{_SHARED_ARGS}
        group: the process group (default: the world).{_SHARED_TAIL}"""


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Optional[Pattern] = None,
    *,
    ulysses_group: Optional[dist.ProcessGroup],
    ring_group: Optional[dist.ProcessGroup],
    layout: str = "zigzag",
    scale: Optional[float] = None,
    return_lse: bool = False,
    timeout: float = DEFAULT_TIMEOUT_S,
    sinks: Optional[torch.Tensor] = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    return _sequence_parallel("hybrid_attention", q, k, v, pattern, ulysses_group, ring_group, layout, scale,
                              return_lse, timeout, hybrid=True, sinks=sinks)


hybrid_attention.__doc__ = f"""Exact attention over a sequence sharded across a ``U x R`` grid: Ulysses inside
    ``ulysses_group``, a ring across ``ring_group`` (build both with :func:`.grid.make_grid`).

    The rank with Ulysses rank ``u`` and ring rank ``r`` holds shard ``r * U + u`` of the layout
    (:func:`make_grid` numbers the ranks so that this is the rank in the grid's group).

    Args:{_SHARED_ARGS}
        ulysses_group: this rank's Ulysses group (``U <= Hq`` ranks).
        ring_group: this rank's ring group (``R`` ranks); the two groups meet in this rank only.{_SHARED_TAIL}"""


__all__ = ["ROUND_BYTES", "hybrid_attention", "ulysses_attention"]
