"""The 2-D process grid of the hybrid scheme: Ulysses groups of ``U`` ranks, ring groups of ``R``.

Rank ``w`` of the grid's group sits at ring rank ``r = w // U`` and Ulysses rank ``u = w % U``:
Ulysses groups are runs of ``U`` consecutive ranks (on GPUs, the fast links of one node), ring
groups take every ``U``-th rank. Rank ``w`` holds shard ``w = r * U + u`` of the sequence, so the
grid shards a sequence exactly as the ring and Ulysses do over the same group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from ..checks import positive_int


@dataclass(frozen=True)
class ParallelGrid:
    """This rank's place in a ``ulysses_degree x ring_degree`` grid over ``group``.

    ``rank`` is this rank in ``group`` (the shard it holds); ``ulysses_group`` and ``ring_group``
    are what :func:`~.ulysses.hybrid_attention` takes.
    """

    group: Optional[dist.ProcessGroup]
    ulysses_group: dist.ProcessGroup
    ring_group: dist.ProcessGroup
    ulysses_degree: int
    ring_degree: int
    rank: int

    @property
    def world_size(self) -> int:
        return self.ulysses_degree * self.ring_degree


def make_grid(ulysses_degree: int, group: Optional[dist.ProcessGroup] = None) -> ParallelGrid:
    """Split ``group`` (default: the world) into Ulysses groups of ``ulysses_degree`` consecutive
    ranks and ring groups across them. A collective call: every rank of ``group`` must make it,
    with the same degree. ValueError unless the degree divides the group's size."""
    positive_int("make_grid", "ulysses_degree", ulysses_degree)
    if not dist.is_initialized():
        raise RuntimeError("make_grid needs torch.distributed: call init_process_group first")
    ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    world = len(ranks)
    if world % ulysses_degree:
        raise ValueError(f"make_grid: ulysses_degree {ulysses_degree} does not divide the group's {world} ranks")
    ring_degree = world // ulysses_degree
    me = ranks.index(dist.get_rank())
    ulysses_group = ring_group = None
    # Every rank creates every group, in the same order (torch.distributed.new_group requires it).
    for r in range(ring_degree):
        made = dist.new_group(ranks[r * ulysses_degree : (r + 1) * ulysses_degree])
        ulysses_group = made if me // ulysses_degree == r else ulysses_group
    for u in range(ulysses_degree):
        made = dist.new_group(ranks[u::ulysses_degree])
        ring_group = made if me % ulysses_degree == u else ring_group
    return ParallelGrid(group, ulysses_group, ring_group, ulysses_degree, ring_degree, me)


__all__ = ["ParallelGrid", "make_grid"]
