"""A batch of zero sequences gives an empty output (and empty gradients) from every path, as the
dense and reference backends do: the sparse planner's portable path (value width other than the
key width) and the ring both divided by the batch size."""

from __future__ import annotations

import pytest
import torch

from attnkit import Causal, SlidingWindow, attention
from attnkit.distributed import ring_attention
from attnkit.distributed.launch import run_group


def _empty(value_width):
    torch.manual_seed(0)
    q, k = torch.randn(0, 4, 16, 8), torch.randn(0, 2, 16, 8)
    return q.requires_grad_(), k.requires_grad_(), torch.randn(0, 2, 16, value_width).requires_grad_()


@pytest.mark.parametrize("value_width", [8, 4], ids=["same-width", "portable-path"])
def test_the_sparse_backend_returns_an_empty_batch(value_width):
    q, k, v = _empty(value_width)
    out = attention(q, k, v, pattern=SlidingWindow(4), backend="sparse")
    out.sum().backward()
    assert out.shape == (0, 4, 16, value_width)
    assert (q.grad.shape, k.grad.shape, v.grad.shape) == (q.shape, k.shape, v.shape)


def _ring_on_an_empty_batch(rank, world):
    q, k, v = _empty(8)
    out = ring_attention(q, k, v, Causal(), timeout=60)
    out.sum().backward()
    return tuple(out.shape), tuple(q.grad.shape)


def test_the_ring_returns_an_empty_batch():
    ranks = run_group(_ring_on_an_empty_batch, 2, deadline_s=120, group_timeout_s=60)
    assert [r.error for r in ranks if not r.ok] == []
    assert [r.value for r in ranks] == [((0, 4, 16, 8), (0, 4, 16, 8))] * 2
