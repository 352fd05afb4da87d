"""RotaryEmbedding reuses its angles across the layers of one forward pass, never stale ones."""

from __future__ import annotations

import torch

from attnkit.nn.rope import RotaryEmbedding


def test_the_same_positions_reuse_the_angles_and_changed_ones_do_not():
    rope = RotaryEmbedding(8, 10000.0)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 3, 8, generator=gen), torch.randn(1, 1, 3, 8, generator=gen)
    positions = torch.arange(3)
    first = rope(q, k, positions)
    cos = rope._last[3]
    second = rope(q, k, positions)  # the next layer: same tensor, same angles
    assert rope._last[3] is cos and torch.equal(first[0], second[0])
    positions.add_(5)  # changed in place: recomputed, not the angles of 0, 1, 2
    moved = rope(q, k, positions)
    expected = RotaryEmbedding(8, 10000.0)(q, k, torch.arange(5, 8))
    assert torch.equal(moved[0], expected[0]) and torch.equal(moved[1], expected[1])
    assert not torch.equal(moved[0], first[0])
    double = rope(q.double(), k.double(), positions)  # another dtype: its own angles
    assert double[0].dtype == torch.float64 and rope._last[3].dtype == torch.float64
