"""Point-to-point messages of the ring, with a timeout on every wait and counters for the stats.

Transfers are posted with ``torch.distributed.batch_isend_irecv`` and waited on later, so the
caller computes while they are in flight (gloo moves them on its own threads, NCCL on its own
stream). Every wait has a deadline: a peer that died or never arrives becomes a ``RuntimeError``
naming the peers and the phase, never a hang.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0


@dataclass
class RingStats:
    """What ring attention did on this rank while recording (see :func:`record_ring_stats`).

    ``compute_s``: wall seconds in attention kernels; ``compute_cpu_s``: CPU seconds of the calling
    thread in them (the fair load measure when ranks share cores; exact with one torch thread per
    rank, which is how the launchers run ranks on a small machine); ``wait_s: seconds blocked on transfers;
    ``bytes_sent``: payload bytes this rank sent; ``forward_steps``/``backward_steps``: ring steps
    run (all ranks run the same number); ``computed_steps``: forward steps where this rank computed
(the backward computes at the same steps).
    """

    compute_s: float = 0.0
    compute_cpu_s: float = 0.0
    wait_s: float = 0.0
    bytes_sent: int = 0
    forward_steps: int = 0
    backward_steps: int = 0
    computed_steps: int = 0
    calls: int = 0


@dataclass
class Pending:
    """Transfers in flight; ``tensors`` keeps their buffers alive until they are waited on."""

    works: list = field(default_factory=list)
    tensors: tuple = ()
    what: str = ""


class RingComm:
    """The ring's view of a process group: its rank, size, neighbours and deadline."""

    def __init__(self, group: Optional[dist.ProcessGroup], timeout_s: float, stats: Optional[RingStats]):
        if not dist.is_initialized():
            raise RuntimeError("ring_attention needs torch.distributed: call init_process_group first")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout_s!r}")
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.timeout = timedelta(seconds=float(timeout_s))
        self.stats = stats

    def _global(self, rank: int) -> int:
        rank %= self.size
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def exchange(self, send: torch.Tensor, to: int, recv: torch.Tensor, source: int, what: str) -> Pending:
        """Post ``send`` to rank ``to`` and a receive into ``recv`` from rank ``source`` (group ranks)."""
        ops = [
            dist.P2POp(dist.isend, send, self._global(to), self.group),
            dist.P2POp(dist.irecv, recv, self._global(source), self.group),
        ]
        if self.stats is not None:
            self.stats.bytes_sent += send.numel() * send.element_size()
        return Pending(dist.batch_isend_irecv(ops), (send, recv), f"{what} (to rank {to % self.size}, "
                       f"from rank {source % self.size})")

    def wait(self, pending: Optional[Pending]) -> None:
        """Block until ``pending`` completes; RuntimeError after the deadline."""
        if pending is None:
            return
        start = time.perf_counter()
        for work in pending.works:
            try:
                work.wait(self.timeout)
            except RuntimeError as exc:
                raise RuntimeError(
                    f"ring attention: rank {self.rank} gave up on {pending.what} after "
                    f"{self.timeout.total_seconds():g} s: a peer died, hung or never joined ({exc})"
                ) from exc
        if self.stats is not None:
            self.stats.wait_s += time.perf_counter() - start

    def all_gather_small(self, values: torch.Tensor, what: str) -> torch.Tensor:
        """``(P, n)``: the small int64 vector ``values`` of every rank, with the deadline."""
        gathered = [torch.empty_like(values) for _ in range(self.size)]
        work = dist.all_gather(gathered, values, group=self.group, async_op=True)
        self.wait(Pending([work], (values,), what))
        return torch.stack(gathered)
