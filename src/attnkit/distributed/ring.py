"""Ring attention (Liu, Zaharia, Abbeel 2023) over ``torch.distributed`` point-to-point messages.

Each rank keeps its query shard; key/value shards travel around the ring (rank ``r`` sends to
``r + 1``), and each step's partial result is merged by its log-sum-exp. The next KV shard is in
flight while the current one is computed. Each (query shard, KV shard) step runs the blockwise
backend with the *global* positions of both shards (``attention(..., q_positions, k_positions)``),
so any pattern means what it means on one device. Only the ``Hkv`` key/value heads travel (GQA/MQA).

Backward is a custom autograd function in the FlashAttention style: the KV shards go around the
ring again together with dK/dV accumulators; each rank recomputes its step's probabilities from
the saved global LSE through the backend's ``grad_share`` (nothing per step is stored), adds its
share to the accumulator while the next KV shard is in flight, and passes it on; after the last
step each accumulator is sent straight to the rank that owns those keys.

Before any of that, every rank checks that all ranks pass the same problem (shard shapes, dtype,
layout, scale, pattern): see :mod:`attnkit.distributed.agreement`.

Steps that no rank needs (a sliding window over contiguous shards) are not run at all: see
:mod:`attnkit.distributed.schedule`. Very long shards go round the ring one group of KV heads at a
time (see :data:`MESSAGE_BYTES`), so the ring's own buffers stay small next to q, k, v and out.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..checks import check_sinks
from ..kernels.common import compute_dtype, merge_lse
from ..kernels.sinks import with_sinks
from ..patterns import Pattern
from .agreement import check_same_everywhere, checked_arguments
from .comm import DEFAULT_TIMEOUT_S, RingComm, current_stats
from .layouts import check_split, group_positions, shard_positions
from .local import joined, part_forward, part_grads, seeing_nonfinite, timed, without_rows
from .schedule import RingSchedule, schedule_for

STEP_BACKEND = "blockwise"
"""The backend of every ring step: it takes explicit positions, and its forward and gradient
share keep memory at a few tiles (no ``shard x shard`` mask or weights)."""
MESSAGE_BYTES = 64 * 2**20
"""K/V bytes a ring message aims at: bigger shards go round the ring one group of heads at a time,
which bounds the ring's buffers (and the kernel's temporaries) without changing any result."""

class _RingCall:
    """The shared state of one ring call: communicator, schedule, positions, kernel settings.

    ``positions[r]`` are the global positions (sorted) of ring rank ``r``'s tokens."""

    def __init__(self, comm: RingComm, schedule: RingSchedule, positions: list, pattern, scale):
        self.comm, self.schedule, self.positions = comm, schedule, positions
        self.pattern, self.scale = pattern, scale

    def needed(self, step: int) -> bool:
        return self.schedule.needed[self.comm.rank][step]

    def source(self, step: int) -> int:
        return (self.comm.rank - step) % self.comm.size

    def step_positions(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.positions[self.comm.rank], self.positions[self.source(step)]


def ring_positions(seq_len: int, layout: str, ulysses_degree: int, world_size: int, *, device=None) -> list[torch.Tensor]:
    """The sorted positions each ring rank of a ``ulysses_degree x (world_size / ulysses_degree)``
    grid holds after the all-to-all: the union of its Ulysses group's shards."""
    return [
        torch.sort(torch.cat(group_positions(seq_len, layout, ulysses_degree, r, world_size, device=device))).values
        for r in range(world_size // ulysses_degree)
    ]


class RingCore:
    """Ring attention as a part of a larger scheme (the hybrid's ring over head shards): ring
    ``comm``'s rank ``r`` holds the tokens at ``positions[r]``; :meth:`forward` and
    :meth:`backward` are the ring's two passes for one group of heads and its pattern."""

    def __init__(self, comm: RingComm, positions: list[torch.Tensor], scale: float):
        self.comm, self.positions, self.scale = comm, positions, scale
        self._schedules: dict[int, RingSchedule] = {}

    def _state(self, pattern: Pattern) -> _RingCall:
        schedule = self._schedules.get(id(pattern))
        if schedule is None:
            schedule = self._schedules[id(pattern)] = schedule_for(pattern, self.positions)
        return _RingCall(self.comm, schedule, self.positions, pattern, self.scale)

    def forward(self, q, k, v, pattern: Pattern):
        state = self._state(pattern)
        if self.comm.stats is not None:
            self.comm.stats.forward_steps += state.schedule.steps
            self.comm.stats.computed_steps += state.schedule.compute_steps(self.comm.rank)
        return _ring_forward(state, q, k, v)

    def backward(self, q, k, v, out, lse, cut, d_out, d_lse, pattern: Pattern):
        state = self._state(pattern)
        if self.comm.stats is not None:
            self.comm.stats.backward_steps += state.schedule.steps
        d_lse = torch.zeros_like(lse) if d_lse is None else d_lse
        out, lse, d_out, d_lse = without_rows(cut, out, lse, d_out, d_lse)
        return _ring_backward(state, q, k, v, out, lse, d_out, d_lse)


def _pack(*tensors: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """One flat contiguous buffer holding ``tensors`` (one message instead of several)."""
    return torch.cat([t.reshape(-1).to(dtype or t.dtype) for t in tensors])


def _unpack(buffer: torch.Tensor, *shapes: torch.Size) -> list[torch.Tensor]:
    views, start = [], 0
    for shape in shapes:
        size = shape.numel()
        views.append(buffer[start : start + size].view(shape))
        start += size
    return views


def _head_groups(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern) -> list:
    """``(query head slice, KV head slice)`` pairs whose K/V message stays near
    :data:`MESSAGE_BYTES` (a per-head pattern keeps all heads together)."""
    n_kv_heads, groups = k.shape[1], q.shape[1] // k.shape[1]
    per_head = max(1, (k[:, :1].numel() + v[:, :1].numel()) * k.element_size())  # 0 in an empty batch
    size = n_kv_heads if pattern.n_heads is not None else max(1, min(n_kv_heads, MESSAGE_BYTES // per_head))
    return [
        (slice(h * groups, min(h + size, n_kv_heads) * groups), slice(h, min(h + size, n_kv_heads)))
        for h in range(0, n_kv_heads, size)
    ]


def _ring_forward(state: _RingCall, q, k, v):
    """``(out, lse, cut)``: ``cut`` marks the rows that may see a non-finite key (None: none)."""
    groups = _head_groups(q, k, v, state.pattern)
    if len(groups) == 1:
        return _forward_heads(state, q, k, v)
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    lse = torch.empty(q.shape[:-1], dtype=compute_dtype(q.dtype), device=q.device)
    cut = None
    for q_heads, kv_heads in groups:
        out[:, q_heads], lse[:, q_heads], seen = _forward_heads(state, q[:, q_heads], k[:, kv_heads], v[:, kv_heads])
        if seen is not None:
            cut = torch.zeros(q.shape[:-1], dtype=torch.bool, device=q.device) if cut is None else cut
            cut[:, q_heads] = seen
    return out, lse, cut


def _ring_backward(state: _RingCall, q, k, v, out, lse, d_out, d_lse):
    groups = _head_groups(q, k, v, state.pattern)
    if len(groups) == 1:
        return _backward_heads(state, q, k, v, out, lse, d_out.contiguous(), d_lse.contiguous())
    d_q, d_k, d_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    for qh, kvh in groups:
        d_q[:, qh], d_k[:, kvh], d_v[:, kvh] = _backward_heads(
            state, q[:, qh], k[:, kvh], v[:, kvh], out[:, qh], lse[:, qh],
            d_out[:, qh].contiguous(), d_lse[:, qh].contiguous(),
        )
    return d_q, d_k, d_v


def _forward_heads(state: _RingCall, q, k, v):
    comm, rank = state.comm, state.comm.rank
    kv, spare = _pack(k, v), None
    out = lse = cut = None
    for step in range(state.schedule.steps):
        pending = None
        if step + 1 < state.schedule.steps:
            spare = torch.empty_like(kv) if spare is None else spare
            pending = comm.exchange(kv, rank + 1, spare, rank - 1, f"forward step {step + 1} keys/values")
        if state.needed(step):
            k_step, v_step = _unpack(kv, k.shape, v.shape)
            part = timed(
                comm.stats,
                lambda *a: part_forward(*a, state.pattern, state.scale, STEP_BACKEND, state.step_positions(step)),
                q, k_step, v_step,
            )
            out, lse = part if out is None else merge_lse([out, part[0]], [lse, part[1]])
            cut = joined(cut, seeing_nonfinite(q, k_step, v_step, state.pattern, state.step_positions(step)))
        comm.wait(pending)
        if pending is not None:
            kv, spare = spare, kv
    if out is None:  # this rank's queries see no key at all
        out = q.new_zeros(*q.shape[:-1], v.shape[-1])
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=compute_dtype(q.dtype), device=q.device)
    return out, lse, cut


def _backward_heads(state: _RingCall, q, k, v, out, lse, d_out, d_lse):
    comm, rank, steps = state.comm, state.comm.rank, state.schedule.steps
    acc_dtype = compute_dtype(k.dtype)
    kv, spare = _pack(k, v), None
    d_q = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    acc_pending = acc_in = None
    for step in range(steps):
        kv_pending = None
        if step + 1 < steps:
            spare = torch.empty_like(kv) if spare is None else spare
            kv_pending = comm.exchange(kv, rank + 1, spare, rank - 1, f"backward step {step + 1} keys/values")
        local = None
        if state.needed(step):
            k_step, v_step = _unpack(kv, k.shape, v.shape)
            d_q_step, d_k_step, d_v_step, _ = timed(  # no parameters: the ring takes no score mod
                comm.stats,
                lambda *a: part_grads(*a, state.pattern, state.scale, STEP_BACKEND, state.step_positions(step)),
                q, k_step, v_step, out, lse, d_out, d_lse,
            )
            d_q += d_q_step
            local = _pack(d_k_step, d_v_step, dtype=acc_dtype)
            del d_q_step, d_k_step, d_v_step
        # The accumulator of this step's KV shard arrives from rank - 1 (its previous holder).
        comm.wait(acc_pending)
        if acc_in is None:
            acc = local if local is not None else kv.new_zeros(kv.shape, dtype=acc_dtype)
        else:
            acc = acc_in if local is None else acc_in.add_(local)
        if step + 1 < steps:
            acc_in = torch.empty_like(acc)
            acc_pending = comm.exchange(acc, rank + 1, acc_in, rank - 1, f"backward step {step + 1} dK/dV")
        comm.wait(kv_pending)
        if kv_pending is not None:
            kv, spare = spare, kv
    if steps > 1:  # send each accumulator home: it holds every rank's share by now
        mine = torch.empty_like(acc)
        comm.wait(comm.exchange(acc, rank - (steps - 1), mine, rank + (steps - 1), "dK/dV return to owners"))
        acc = mine
    d_k, d_v = _unpack(acc, k.shape, v.shape)
    return d_q.to(q.dtype), d_k.to(k.dtype), d_v.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, state):
        out, lse, cut = _ring_forward(state, q, k, v)
        ctx.save_for_backward(q, k, v, out, lse, cut)
        ctx.state = state
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse, cut = ctx.saved_tensors
        state = ctx.state
        if state.comm.stats is not None:
            state.comm.stats.backward_steps += state.schedule.steps
        out, lse, d_out, d_lse = without_rows(cut, out, lse, d_out, d_lse)
        grads = _ring_backward(state, q, k, v, out, lse, d_out, d_lse)
        return (*grads, None)


def ring_attention(
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
    """Exact attention over a sequence sharded across the ranks of ``group``.

    Every rank calls it with its own shard (see :func:`attnkit.distributed.shard`); the result is
    the shard of what :func:`attnkit.attention` gives on the full tensors, forward and backward.

    Args:
        q: ``(B, Hq, N/P, D)`` this rank's queries, in ``layout`` order.
        k: ``(B, Hkv, N/P, D)`` this rank's keys (``Hq % Hkv == 0``; only these heads travel).
        v: ``(B, Hkv, N/P, Dv)`` this rank's values.
        pattern: which keys each query may see, at global positions (default Full). A query at
            global position ``i`` and a key at ``j`` use ``pattern.allows(i, j)``.
        group: the process group of the ring (default: the world).
        layout: ``"contiguous"``, ``"zigzag"`` or ``"striped"`` (see :mod:`.layouts`).
        scale: multiplier of ``q @ k^T``; default ``1 / sqrt(D)``.
        return_lse: also return this shard's log-sum-exp ``(B, Hq, N/P)`` (float32 for half inputs).
        timeout: seconds any transfer may wait for a peer before a ``RuntimeError``.
        sinks: ``(Hq,)`` attention sinks as in :func:`attnkit.attention`, the same on every rank
            (a layer's parameter); joined once, to the LSE merged over the whole ring.
    Returns:
        ``out (B, Hq, N/P, Dv)``, or ``(out, lse)``. Differentiable in q, k, v (and sinks).
    Raises:
        ValueError / TypeError: bad local input (as :func:`attnkit.attention`), an unknown layout,
            a pattern that does not fit the sequence, a shard length the layout cannot split
            (zigzag needs an even shard), or shards of different shapes, dtypes, layouts, scales
            or patterns across ranks. Raised on every rank (see :mod:`.agreement`): the rank at
            fault raises its own error, the others a ValueError naming that rank and its error.
        RuntimeError: torch.distributed not initialised, a peer that does not answer in time, or
            a lost connection; the message names this rank, the peer and the phase (forward
            step k, backward step k, ...). The group may then hold transfers that will never
            complete: destroy it (``dist.destroy_process_group``, which returns at once, since the
            ring leaves no collective pending) rather than use it again.
    """
    stats = current_stats()
    comm = RingComm(group, timeout, stats)
    pattern, scale, problem = checked_arguments(q, k, v, pattern, layout, scale)
    check_same_everywhere([comm], q, k, v, pattern, layout, scale, problem)
    seq_len = q.shape[2] * comm.size
    check_split(seq_len, layout, comm.size)
    positions = [shard_positions(seq_len, layout, r, comm.size, device=q.device) for r in range(comm.size)]
    schedule = schedule_for(pattern, positions)
    state = _RingCall(comm, schedule, positions, pattern, scale)
    if stats is not None:
        stats.calls += 1
        stats.forward_steps += schedule.steps
        stats.computed_steps += schedule.compute_steps(comm.rank)
    out, lse = _RingAttention.apply(q, k, v, state)
    if sinks is not None:
        out, lse = with_sinks(out, lse, check_sinks(sinks, q.shape[1], q.dtype, q.device))
    return (out, lse) if return_lse else out
