"""Bytes this rank sends, counted by a wrapper around every ``torch.distributed`` send and collective.

The count does not ask the schemes what they sent (their own count is :class:`.comm.RingStats`):
inside :func:`count_traffic`, the functions of ``torch.distributed`` that move data are replaced by
wrappers that add up the payload handed to them, then call the original. Point-to-point sends
(``isend``, also inside ``batch_isend_irecv``, and ``send``) count their tensor. Collectives
count what this rank must send to the others whatever the algorithm: ``all_to_all`` and
``all_to_all_single`` every chunk but its own, ``all_gather`` / ``all_gather_into_tensor`` its
tensor once per other rank, ``broadcast`` its tensor once per other rank on the source,
``all_reduce`` and ``reduce_scatter_tensor`` ``2 (P - 1) / P`` of the tensor (a ring's share).
Receives count nothing (the peer's send counted them).
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d


@dataclass
class Traffic:
    """Bytes sent by this rank while counting: ``bytes_sent`` in all, ``by_call`` per function
    name, ``calls`` per function name."""

    bytes_sent: int = 0
    by_call: dict = field(default_factory=lambda: defaultdict(int))
    calls: dict = field(default_factory=lambda: defaultdict(int))


_active: list[Traffic] = []


def _size(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _payload(name: str, call: dict) -> int:
    """Bytes this rank sends to others in the call ``name(**call)`` (its arguments by name)."""
    group = call.get("group")
    if name in ("isend", "send"):
        return _size(call["tensor"])
    world, me = dist.get_world_size(group), dist.get_rank(group)
    if name == "all_to_all":
        return sum(_size(t) for r, t in enumerate(call["input_tensor_list"]) if r != me)
    if name == "all_to_all_single":
        source, splits = call["input"], call.get("input_split_sizes")
        rows = list(splits) if splits else [source.shape[0] // world] * world
        return _size(source) * (sum(rows) - rows[me]) // max(sum(rows), 1)
    if name in ("all_gather", "all_gather_into_tensor"):
        return _size(call["tensor" if name == "all_gather" else "input_tensor"]) * (world - 1)
    if name == "broadcast":
        source = call.get("group_src")
        source = dist.get_group_rank(group or dist.group.WORLD, call["src"]) if source is None else source
        return _size(call["tensor"]) * (world - 1) if me == source else 0
    return 2 * (world - 1) * _size(call["tensor" if name == "all_reduce" else "input"]) // world


_WRAPPED = ("isend", "send", "all_to_all", "all_to_all_single", "all_gather", "all_gather_into_tensor",
            "broadcast", "all_reduce", "reduce_scatter_tensor")


def _wrap(name: str, original):
    signature = inspect.signature(original)

    def counted(*args, **kwargs):
        sent = _payload(name, signature.bind(*args, **kwargs).arguments)
        for traffic in _active:
            traffic.bytes_sent += sent
            traffic.by_call[name] += sent
            traffic.calls[name] += 1
        return original(*args, **kwargs)

    counted.__name__ = counted.__qualname__ = name
    return counted


@contextmanager
def count_traffic() -> Iterator[Traffic]:
    """Count the bytes this process sends through ``torch.distributed`` inside the block (see the
    module docstring). Nested blocks each count what was sent inside them."""
    traffic = Traffic()
    originals = {}
    if not _active:
        for name in _WRAPPED:
            originals[name] = getattr(c10d, name)
            wrapper = _wrap(name, originals[name])
            # c10d's own module global too: batch_isend_irecv calls ``op.op`` and checks it is c10d's isend.
            setattr(c10d, name, wrapper)
            setattr(dist, name, wrapper)
    _active.append(traffic)
    try:
        yield traffic
    finally:
        _active.remove(traffic)
        for name, original in originals.items():
            setattr(c10d, name, original)
            setattr(dist, name, original)


__all__ = ["Traffic", "count_traffic"]
