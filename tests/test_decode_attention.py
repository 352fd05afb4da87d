"""decode_attention: a few queries over a cache's slots equal reference attention over the sequence.

The cache is simulated: the keys of positions ``0 .. p`` are scattered over the slots in random
order, between empty slots (position -1) that hold NaN, so a slot the kernel must ignore would
poison the result if it were read. The oracle is ``attention(..., backend="reference")`` over
the keys in order, in float64, forward and gradients.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit import Causal, Fixed, Full, PerHead, Predicate, SlidingWindow, Strided, attention
from attnkit.kernels.decode import decode_attention
from attnkit.nn.kv_cache import EMPTY

PATTERNS = {
    "full": Full(),
    "causal": Causal(),
    "window": SlidingWindow(3),
    "strided": Strided(3),
    "fixed": Fixed(4, 1),
    "nothing-before": Predicate(lambda i, j: j < i),  # the query at position 0 sees no key
    "per-head": PerHead([Causal(), SlidingWindow(2), Strided(2), Full()]),
}


def _into_slots(x: torch.Tensor, order: torch.Tensor, slots: int) -> torch.Tensor:
    """``x (B, H, n, D)`` placed at slots ``order`` of ``slots`` (differentiably); the other slots NaN."""
    empty = torch.full((*x.shape[:2], slots, x.shape[3]), math.nan, dtype=x.dtype)
    return empty.index_copy(2, order, x)


@st.composite
def cases(draw):
    n_kv, groups = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2]))
    name = draw(st.sampled_from(sorted(PATTERNS)))
    if name == "per-head":
        n_kv, groups = 2, 2
    n_q = draw(st.sampled_from([1, 1, 2, 3]))
    n_k = draw(st.integers(n_q, 14))  # positions 0 .. n_k - 1; the queries are the newest n_q
    slots = n_k + draw(st.integers(0, 5))
    batch, dim = draw(st.integers(1, 2)), draw(st.sampled_from([4, 8]))
    padded = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return name, n_kv, groups, n_q, n_k, slots, batch, dim, padded, seed


@settings(deadline=None, max_examples=60)
@given(cases())
def test_equals_reference_attention_in_float64(case):
    name, n_kv, groups, n_q, n_k, slots, batch, dim, padded, seed = case
    pattern = PATTERNS[name]
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n_kv * groups, n_q, dim, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(batch, n_kv, n_k, dim, dtype=torch.float64, generator=gen, requires_grad=True)
    v = torch.randn(batch, n_kv, n_k, dim, dtype=torch.float64, generator=gen, requires_grad=True)
    padding = torch.rand(batch, n_k, generator=gen) < 0.7 if padded else None
    expected = attention(q, k, v, pattern, backend="reference", key_padding_mask=padding)
    order = torch.randperm(slots, generator=gen)[:n_k]
    k_positions = torch.full((slots,), EMPTY, dtype=torch.long).index_copy(0, order, torch.arange(n_k))
    slot_padding = None
    if padding is not None:
        slot_padding = torch.zeros(batch, slots, dtype=torch.bool).index_copy(1, order, padding)
    got = decode_attention(q, _into_slots(k, order, slots), _into_slots(v, order, slots), pattern, torch.arange(n_k - n_q, n_k), k_positions,
                           key_padding_mask=slot_padding)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_a_row_that_sees_nothing_gives_zeros():
    q, k, v = (torch.randn(1, 2, n, 4, dtype=torch.float64) for n in (1, 5, 5))
    positions = torch.arange(5)
    out = decode_attention(q, k, v, Causal(), torch.tensor([4]), positions,
                           key_padding_mask=torch.zeros(1, 5, dtype=torch.bool))
    assert torch.equal(out, torch.zeros_like(out))
    out = decode_attention(q, k, v, Causal(), torch.tensor([4]), torch.full((5,), EMPTY))
    assert torch.equal(out, torch.zeros_like(out))


def test_nan_in_a_hidden_key_stays_out_and_a_visible_one_comes_in():
    q, k, v = (torch.randn(1, 2, n, 4, dtype=torch.float64) for n in (1, 6, 6))
    k[:, :, 0] = math.nan  # position 0: outside SlidingWindow(3) of the query at position 5
    v[:, :, 1] = math.inf
    positions = torch.arange(6)
    out = decode_attention(q, k, v, SlidingWindow(3), torch.tensor([5]), positions)
    expected = attention(q, k[:, :, 3:], v[:, :, 3:], SlidingWindow(3), backend="reference")
    torch.testing.assert_close(out, expected)
    assert torch.isnan(decode_attention(q, k, v, Causal(), torch.tensor([5]), positions)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_keep_float32_statistics(dtype):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 6, n, 16, generator=gen) for n in (1, 40, 40))
    expected = attention(q.double(), k.double(), v.double(), Causal(), backend="reference")
    out = decode_attention(q.to(dtype), k.to(dtype), v.to(dtype), Causal(), torch.tensor([39]), torch.arange(40))
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)
