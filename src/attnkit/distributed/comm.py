"""Point-to-point messages of the schemes (ring steps, Ulysses' all-to-all), with a timeout on every
wait and counters for the stats.

Transfers are posted with ``torch.distributed.batch_isend_irecv`` and waited on later, so the
caller computes while they are in flight (gloo moves them on its own threads, NCCL on its own
stream). Every wait has a deadline: a peer that died or never arrives becomes a ``RuntimeError``
naming this rank, the peer and the phase, never a hang; a connection that closes (the peer
died) says so at once instead of as gloo's bare "Connection closed by peer".

Only point-to-point messages are used, the small all-gather included: a collective that times out
stays pending on gloo's worker thread until the process group's own timeout, and keeps the process
from exiting until then; a point-to-point wait leaves nothing behind.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Iterator, Optional

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0


@dataclass
class RingStats:
    """What the sequence-parallel calls (ring, Ulysses, hybrid) did on this rank while recording
    (see :func:`record_ring_stats`).

    ``compute_s``: wall seconds in attention kernels; ``compute_cpu_s``: CPU seconds of the calling
    thread in them (the fair load measure when ranks share cores; exact with one torch thread per
    rank, which is how the launchers run ranks on a small machine); ``wait_s: seconds blocked on transfers;
    ``bytes_sent``: payload bytes this rank sent (the schemes' own count; see
    :mod:`.traffic` for the count of a wrapper around torch.distributed); ``forward_steps`` /
    ``backward_steps``: ring steps run (all ranks of a ring run the same number; none for
    Ulysses); ``computed_steps``: forward steps where this rank computed (the backward computes
    at the same steps).
    """

    compute_s: float = 0.0
    compute_cpu_s: float = 0.0
    wait_s: float = 0.0
    bytes_sent: int = 0
    forward_steps: int = 0
    backward_steps: int = 0
    computed_steps: int = 0
    calls: int = 0


_recording: list[RingStats] = []


@contextmanager
def record_ring_stats() -> Iterator[RingStats]:
    """Count compute time, wait time, bytes sent and steps of the ring, Ulysses and hybrid calls
    made inside the block (their backward passes included, even when run after the block)."""
    stats = RingStats()
    _recording.append(stats)
    try:
        yield stats
    finally:
        _recording.remove(stats)


def current_stats() -> Optional[RingStats]:
    """The stats being recorded now (the innermost :func:`record_ring_stats`), or None."""
    return _recording[-1] if _recording else None


@dataclass
class Pending:
    """Transfers in flight; ``tensors`` keeps their buffers alive until they are waited on."""

    works: list = field(default_factory=list)
    tensors: tuple = ()
    what: str = ""
    peers: tuple = ()  # the peer of each work, in order


def gloo_reason(exc: BaseException) -> str:
    """The useful part of a gloo/NCCL error: ``Connection closed by peer [127.0.0.1]:4321``."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = text.split("] ", 1)[1] if text.startswith("[") and "] " in text else text
    return text.split(". This is typically", 1)[0]


_LOST_CONNECTION = (
    "connection closed", "closed by peer", "connection reset", "broken pipe", "connection refused",
    "remote process exited", "ncclremoteerror", "ncclsystemerror", "communicator was aborted",
)


def is_lost_connection(error: BaseException | str) -> bool:
    """Whether a gloo/NCCL error (or its text) says a connection to a peer is gone (rather than
    bad usage)."""
    text = str(error).lower()
    return any(marker in text for marker in _LOST_CONNECTION)


class RingComm:
    """The ring's view of a process group: its rank, size, neighbours and deadline."""

    def __init__(self, group: Optional[dist.ProcessGroup], timeout_s: float, stats: Optional[RingStats]):
        if not dist.is_initialized():
            raise RuntimeError("attnkit.distributed needs torch.distributed: call init_process_group first")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < float("inf"):
            raise ValueError(f"timeout must be a positive, finite number of seconds, got {timeout_s!r}")
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.timeout = timedelta(seconds=float(timeout_s))
        self.stats = stats

    def _global(self, rank: int) -> int:
        rank %= self.size
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def global_rank(self, rank: int) -> int:
        """The global rank of this group's rank ``rank`` (what messages name)."""
        return self._global(rank)

    def exchange(self, send: torch.Tensor, to: int, recv: torch.Tensor, source: int, what: str) -> Pending:
        """Post ``send`` to rank ``to`` and a receive into ``recv`` from rank ``source`` (group
        ranks), counted in the stats. RuntimeError naming the peers and ``what`` when a
        connection is already closed or the backend refuses a tensor."""
        if self.stats is not None:
            self.stats.bytes_sent += send.numel() * send.element_size()
        to, source = to % self.size, source % self.size
        return self._batch([(send, to)], [(recv, source)], f"{what} (to rank {to}, from rank {source})")

    def _batch(self, sends: list, recvs: list, what: str) -> Pending:
        """Post ``(tensor, group rank)`` sends and receives as one batch."""
        ops = [dist.P2POp(dist.isend, t, self._global(r), self.group) for t, r in sends]
        ops += [dist.P2POp(dist.irecv, t, self._global(r), self.group) for t, r in recvs]
        try:
            works = dist.batch_isend_irecv(ops)
        except RuntimeError as exc:
            if is_lost_connection(exc):
                raise RuntimeError(
                    f"ring attention: rank {self.rank} could not start {what}: a connection is closed, "
                    f"a peer died ({gloo_reason(exc)})"
                ) from exc
            # Anything else is this rank's own doing (a tensor the backend cannot send), not a peer's.
            raise RuntimeError(f"ring attention: rank {self.rank} could not start {what}: {gloo_reason(exc)}") from exc
        # gloo gives one work per message, so a failed wait names its peer; NCCL may coalesce them.
        peers = tuple(r for _, r in sends + recvs) if len(works) == len(ops) else ()
        return Pending(works, tuple(t for t, _ in sends + recvs), what, peers)

    def wait(self, pending: Optional[Pending]) -> None:
        """Block until ``pending`` completes; RuntimeError naming this rank, the peer and the
        phase after the deadline or when a connection closes."""
        if pending is None:
            return
        start = time.perf_counter()
        for i, work in enumerate(pending.works):
            try:
                work.wait(self.timeout)
            except RuntimeError as exc:
                peer = f"rank {pending.peers[i]}" if pending.peers else "a peer"
                waited = time.perf_counter() - start
                timed_out = "timed out" in str(exc).lower() or waited >= 0.9 * self.timeout.total_seconds()
                if not timed_out:
                    raise RuntimeError(
                        f"ring attention: rank {self.rank} lost {peer} during {pending.what} after "
                        f"{waited:.1f} s: the connection closed, the peer died ({gloo_reason(exc)})"
                    ) from exc
                raise RuntimeError(
                    f"ring attention: rank {self.rank} gave up on {pending.what} after "
                    f"{self.timeout.total_seconds():g} s waiting for {peer}: a peer died, hung or never "
                    f"joined ({gloo_reason(exc)})"
                ) from exc
        if self.stats is not None:
            self.stats.wait_s += time.perf_counter() - start

    def all_to_all(self, sends: list[torch.Tensor], recvs: list[torch.Tensor], what: str) -> None:
        """Send ``sends[r]`` to every other rank ``r`` and receive ``recvs[r]`` from it, as one
        batch of point-to-point messages within the deadline (empty tensors are not sent);
        counted in the stats. ``sends[self.rank]`` and ``recvs[self.rank]`` are left alone."""
        others = [r for r in range(self.size) if r != self.rank]
        out = [(sends[r].contiguous(), r) for r in others if sends[r].numel()]
        into = [(recvs[r], r) for r in others if recvs[r].numel()]
        if self.stats is not None:
            self.stats.bytes_sent += sum(t.numel() * t.element_size() for t, _ in out)
        if out or into:
            self.wait(self._batch(out, into, what))

    def all_gather_small(self, values: torch.Tensor, what: str) -> torch.Tensor:
        """``(P, n)``: the small vector ``values`` of every rank (row ``r`` from rank ``r``), sent
        point to point to every other rank in one batch, within the deadline; not counted in the
        stats."""
        gathered = [values if r == self.rank else torch.empty_like(values) for r in range(self.size)]
        others = [r for r in range(self.size) if r != self.rank]
        if others:
            self.wait(self._batch([(values, r) for r in others], [(gathered[r], r) for r in others], what))
        return torch.stack(gathered)
