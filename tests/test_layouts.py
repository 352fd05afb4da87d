"""Shard layouts, their positions, shard/assemble round trips, and the ring step schedule."""

from __future__ import annotations

import math

import pytest
import torch

from attnkit import Causal, Full, Predicate, SlidingWindow
from attnkit.distributed import LAYOUTS, assemble, ring_schedule, shard, shard_positions


def test_zigzag_rank_holds_chunks_r_and_2p_minus_1_minus_r():
    # 16 tokens, 4 ranks -> 8 chunks of 2.
    assert shard_positions(16, "zigzag", 0, 4).tolist() == [0, 1, 14, 15]
    assert shard_positions(16, "zigzag", 1, 4).tolist() == [2, 3, 12, 13]
    assert shard_positions(16, "zigzag", 3, 4).tolist() == [6, 7, 8, 9]
    assert shard_positions(12, "contiguous", 1, 3).tolist() == [4, 5, 6, 7]
    assert shard_positions(12, "striped", 1, 3).tolist() == [1, 4, 7, 10]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_partition_the_sequence_and_assemble_inverts_shard(layout, world):
    n = 24
    positions = torch.cat([shard_positions(n, layout, r, world) for r in range(world)])
    assert sorted(positions.tolist()) == list(range(n))
    x = torch.randn(2, 3, n, 5, requires_grad=True)
    shards = [shard(x, layout, rank=r, world_size=world) for r in range(world)]
    assert all(s.shape == (2, 3, n // world, 5) for s in shards)
    back = assemble(shards, layout)
    assert torch.equal(back, x)
    back.sum().backward()  # differentiable both ways
    assert torch.equal(x.grad, torch.ones_like(x))


def test_shard_along_another_dim():
    x = torch.arange(8).view(1, 8, 1)
    assert shard(x, "zigzag", dim=1, rank=1, world_size=2).flatten().tolist() == [2, 3, 4, 5]


@pytest.mark.parametrize(
    "n, layout, world, unit",
    [(10, "zigzag", 3, 6), (7, "contiguous", 2, 2), (9, "striped", 2, 2), (6, "zigzag", 2, 4)],
)
def test_a_sequence_the_layout_cannot_split_is_rejected(n, layout, world, unit):
    with pytest.raises(ValueError, match=f"cannot be split by layout '{layout}'.*multiple of {unit}"):
        shard(torch.zeros(1, 1, n, 1), layout, rank=0, world_size=world)


def test_bad_layout_rank_and_arguments():
    with pytest.raises(ValueError, match="layout must be one of contiguous, zigzag, striped; got 'ring'"):
        shard_positions(8, "ring", 0, 2)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got 2"):
        shard_positions(8, "zigzag", 2, 2)
    with pytest.raises(ValueError, match="rank and world_size must be given together"):
        shard(torch.zeros(1, 1, 8, 1), rank=0)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        shard(torch.zeros(1, 1, 8, 1))
    with pytest.raises(ValueError, match="one shape"):
        assemble([torch.zeros(1, 1, 2, 1), torch.zeros(1, 1, 3, 1)])


@pytest.mark.parametrize("window, shard_len", [(1, 8), (5, 8), (8, 8), (9, 8), (17, 8), (30, 12), (1024, 2048)])
def test_a_causal_window_over_contiguous_shards_runs_at_most_ceil_window_over_shard_plus_one_steps(window, shard_len):
    world = 16
    schedule = ring_schedule(SlidingWindow(window), "contiguous", shard_len * world, world)
    assert schedule.steps <= math.ceil(window / shard_len) + 1
    # Exactly the shards the window reaches: the first query of a shard looks back window - 1.
    assert schedule.steps == math.ceil((window - 1) / shard_len) + 1
    assert schedule.steps < world


def test_schedule_of_causal_layouts_and_full():
    # Contiguous causal: rank r computes r + 1 of the P steps; zigzag and striped: every rank all P.
    contiguous = ring_schedule(Causal(), "contiguous", 32, 4)
    assert contiguous.steps == 4
    assert [contiguous.compute_steps(r) for r in range(4)] == [1, 2, 3, 4]
    for layout in ("zigzag", "striped"):
        schedule = ring_schedule(Causal(), layout, 32, 4)
        assert [schedule.compute_steps(r) for r in range(4)] == [4, 4, 4, 4]
    assert ring_schedule(Full(), "zigzag", 32, 4).steps == 4
    # A non-causal window needs both neighbours: a one-way ring reaches the next rank last.
    assert ring_schedule(SlidingWindow(3, causal=False), "contiguous", 32, 4).steps == 4
    # Patterns without a band are not analysed: every step runs, the kernel skips empty tiles.
    assert ring_schedule(Predicate(lambda i, j: i == j), "contiguous", 32, 4).steps == 4
