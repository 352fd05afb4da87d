"""Ulysses' all-to-all: sequence shards in, head shards out, and back (Jacobs et al. 2023).

Rank ``t`` of the group holds the tokens at ``positions[t]`` for every head. :meth:`to_heads`
gives each rank its range of heads over the tokens of the whole group, sorted by position (so a
group that holds the whole sequence sees positions ``0 .. N-1``, as on one device);
:meth:`to_sequence` sends head shards back to the ranks that own the tokens, adding up the copies
of a head that went to several ranks (a replicated KV head's gradients). The two are each other's
adjoint, which is what the backward pass uses. Every transfer is one batch of point-to-point
messages (:meth:`RingComm.all_to_all`), with the deadline and the error messages of the ring.
"""

from __future__ import annotations

import torch

from .comm import RingComm
from .heads import Range


class HeadExchange:
    """The all-to-all of one group ``comm`` whose rank ``t`` holds the tokens at ``positions[t]``
    (equal lengths, each sorted)."""

    def __init__(self, comm: RingComm, positions: list[torch.Tensor]):
        self.comm = comm
        self.shard_len = positions[0].numel()
        joined = torch.cat(positions)
        order = torch.argsort(joined)
        in_order = torch.equal(order, torch.arange(len(order), device=order.device))
        self.order = None if in_order else order
        self.inverse = None if in_order else torch.argsort(order)
        self.positions = joined[order]
        """Positions of the gathered sequence ``(U * N/U,)``, sorted."""

    def to_heads(self, x: torch.Tensor, ranges: tuple[Range, ...], what: str) -> torch.Tensor:
        """``x (B, H, n, ...)``, this rank's tokens of every head -> ``(B, h, U * n, ...)``: this rank's
        heads ``ranges[rank]`` over the group's tokens in position order."""
        me = self.comm.rank
        start, stop = ranges[me]
        shape = (x.shape[0], stop - start, self.shard_len, *x.shape[3:])
        sends = [x[:, a:b] for a, b in ranges]
        recvs = [sends[me] if t == me else x.new_empty(shape) for t in range(self.comm.size)]
        self.comm.all_to_all(sends, recvs, what)
        gathered = torch.cat(recvs, dim=2)
        return gathered if self.order is None else gathered.index_select(2, self.order)

    def to_sequence(
        self, y: torch.Tensor, ranges: tuple[Range, ...], into: torch.Tensor, what: str, *, add: bool = False
    ) -> None:
        """The inverse: ``y (B, h, U * n, ...)``, this rank's heads over the group's tokens, goes to
        the ranks that own the tokens; ``into (B, H, n, ...)`` receives every rank's heads
        ``ranges[t]`` of this rank's tokens (added to what it holds with ``add``: heads that
        several ranks computed are summed)."""
        me = self.comm.rank
        unsorted = y if self.inverse is None else y.index_select(2, self.inverse)
        pieces = list(unsorted.split(self.shard_len, dim=2))
        recvs = [
            pieces[me] if t == me else y.new_empty((y.shape[0], b - a, self.shard_len, *y.shape[3:]))
            for t, (a, b) in enumerate(ranges)
        ]
        self.comm.all_to_all(pieces, recvs, what)
        for (a, b), piece in zip(ranges, recvs):
            if b > a:
                if add:
                    into[:, a:b] += piece
                else:
                    into[:, a:b] = piece


__all__ = ["HeadExchange"]
