"""How a sequence is split across the ranks of a ring: contiguous, zigzag or striped shards.

Every layout gives each of ``P`` ranks ``N / P`` positions; a shard keeps its positions in
increasing order, so a rank's tokens stay in sequence order.

- ``"contiguous"``: rank ``r`` holds ``[r * N/P, (r + 1) * N/P)``. Under a causal pattern rank 0
  has almost nothing to do and rank ``P - 1`` the most; with a sliding window each rank needs only
  its few predecessors, so this is the layout that lets a window skip ring steps.
- ``"zigzag"`` (default): the sequence is cut into ``2P`` chunks and rank ``r`` holds chunks ``r``
  and ``2P - 1 - r``: one early and one late chunk, which balances causal work across ranks.
- ``"striped"``: rank ``r`` holds positions ``r, r + P, r + 2P, ...`` (Striped Attention,
  Brandon et al. 2023), which also balances causal work.

Position ids of a shard (:func:`shard_positions`) are what RoPE needs to rotate a shard's queries
and keys as if the whole sequence were on one device.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

LAYOUTS = ("contiguous", "zigzag", "striped")


def check_layout(layout: object) -> str:
    """``layout`` itself when it is one of :data:`LAYOUTS`, else a ValueError naming the choices."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    return layout  # type: ignore[return-value]


def split_unit(layout: str, world_size: int) -> int:
    """The sequence length must be a multiple of this: ``P`` (contiguous, striped) or ``2P`` (zigzag)."""
    return 2 * world_size if check_layout(layout) == "zigzag" else world_size


def check_split(seq_len: int, layout: str, world_size: int) -> None:
    """ValueError unless a sequence of ``seq_len`` splits into equal shards under ``layout``."""
    unit = split_unit(layout, world_size)
    if seq_len <= 0 or seq_len % unit:
        raise ValueError(
            f"a sequence of {seq_len} tokens cannot be split by layout {layout!r} over "
            f"{world_size} ranks: the length must be a positive multiple of {unit}"
        )


def shard_positions(
    seq_len: int,
    layout: str,
    rank: int,
    world_size: int,
    *,
    device: Optional[torch.device | str] = None,
) -> torch.Tensor:
    """Global positions (int64, increasing, length ``seq_len / world_size``) held by ``rank``."""
    check_split(seq_len, layout, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    size = seq_len // world_size
    if layout == "contiguous":
        return torch.arange(rank * size, (rank + 1) * size, device=device)
    if layout == "striped":
        return torch.arange(rank, seq_len, world_size, device=device)
    chunk = size // 2
    late = 2 * world_size - 1 - rank
    return torch.cat([
        torch.arange(rank * chunk, (rank + 1) * chunk, device=device),
        torch.arange(late * chunk, (late + 1) * chunk, device=device),
    ])


def group_positions(seq_len: int, layout: str, ulysses_degree: int, ring_rank: int, world_size: int,
                    *, device: Optional[torch.device | str] = None) -> list[torch.Tensor]:
    """The positions of each rank of ring rank ``ring_rank``'s Ulysses group in a grid of
    ``world_size`` ranks: rank ``u`` of the group holds shard ``ring_rank * ulysses_degree + u``."""
    return [shard_positions(seq_len, layout, ring_rank * ulysses_degree + u, world_size, device=device)
            for u in range(ulysses_degree)]


def _rank_and_size(group, rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    if (rank is None) != (world_size is None):
        raise ValueError("rank and world_size must be given together")
    if rank is not None:
        return rank, world_size  # type: ignore[return-value]
    if not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call init_process_group, or pass rank and world_size"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def shard(
    x: torch.Tensor,
    layout: str = "zigzag",
    group: Optional[dist.ProcessGroup] = None,
    dim: int = 2,
    *,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
) -> torch.Tensor:
    """This rank's shard of the full tensor ``x`` along ``dim`` (default 2, the sequence axis of
    ``(B, H, N, D)``): ``x.shape[dim]`` becomes ``N / P``. The rank and world size come from
    ``group`` (default: the world) unless ``rank`` and ``world_size`` are given. Differentiable.

    Raises ValueError when ``N`` does not split under ``layout`` (zigzag needs a multiple of 2P).
    """
    rank, world_size = _rank_and_size(group, rank, world_size)
    positions = shard_positions(x.shape[dim], layout, rank, world_size, device=x.device)
    return x.index_select(dim, positions)


def assemble(shards: Sequence[torch.Tensor], layout: str = "zigzag", dim: int = 2) -> torch.Tensor:
    """The full tensor from the shards of every rank (``shards[r]`` is rank ``r``'s): the inverse
    of :func:`shard`. Differentiable."""
    world_size = len(shards)
    if world_size == 0:
        raise ValueError("shards must hold one tensor per rank, got none")
    sizes = {s.shape for s in shards}
    if len(sizes) != 1:
        raise ValueError(f"shards must all have one shape, got {sorted(tuple(s) for s in sizes)}")
    seq_len = shards[0].shape[dim] * world_size
    order = torch.cat([
        shard_positions(seq_len, layout, r, world_size, device=shards[0].device) for r in range(world_size)
    ])
    stacked = torch.cat(list(shards), dim=dim)
    return stacked.index_select(dim, torch.argsort(order))


def unshard(
    x: torch.Tensor,
    layout: str = "zigzag",
    group: Optional[dist.ProcessGroup] = None,
    dim: int = 2,
) -> torch.Tensor:
    """The full tensor, on every rank, from each rank's shard ``x`` (an all-gather over ``group``).

    Not differentiable (it is meant for checking and logging); every rank must call it with
    shards of one shape.
    """
    world_size = dist.get_world_size(group)
    gathered = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(gathered, x.contiguous(), group=group)
    return assemble(gathered, layout, dim)


__all__ = [
    "LAYOUTS", "assemble", "check_layout", "check_split", "group_positions", "shard", "shard_positions", "split_unit",
    "unshard",
]
