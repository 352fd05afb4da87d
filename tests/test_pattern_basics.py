"""Foundation patterns: definitions, bottom-right alignment, block layouts, density, composition."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, strategies as st

from attnkit import Causal, Full, PerHead, Predicate, SlidingWindow
from attnkit.patterns import Intersection, Union, query_key_positions
from strategies import simple_patterns


def _brute_mask(rule, n_q, n_k):
    offset = n_k - n_q
    return torch.tensor([[bool(rule(r + offset, c)) for c in range(n_k)] for r in range(n_q)])


@pytest.mark.parametrize("n_q, n_k", [(5, 5), (3, 8), (8, 3), (1, 6)])
def test_masks_follow_the_definitions_with_bottom_right_alignment(n_q, n_k):
    cases = {
        Full(): lambda i, j: True,
        Causal(): lambda i, j: j <= i,
        SlidingWindow(3): lambda i, j: 0 <= i - j < 3,
        SlidingWindow(2, causal=False): lambda i, j: abs(i - j) < 2,
        Predicate(lambda i, j: (i + j) % 3 == 0): lambda i, j: (i + j) % 3 == 0,
        Causal() & SlidingWindow(2, causal=False): lambda i, j: 0 <= i - j < 2,
        SlidingWindow(1) | Predicate(lambda i, j: j == 0): lambda i, j: i == j or j == 0,
    }
    for pattern, rule in cases.items():
        assert torch.equal(pattern.mask(n_q, n_k), _brute_mask(rule, n_q, n_k)), repr(pattern)


def test_decoding_row_sees_the_whole_cache_under_causal():
    assert Causal().mask(1, 7).all()
    q_pos, k_pos = query_key_positions(2, 7)
    assert q_pos.tolist() == [5, 6] and k_pos.tolist() == list(range(7))


@given(pattern=simple_patterns(), n_q=st.integers(1, 70), n_k=st.integers(1, 70), block=st.integers(1, 20))
def test_block_layout_marks_exactly_the_blocks_with_an_allowed_pair(pattern, n_q, n_k, block):
    mask = pattern.mask(n_q, n_k)
    expected = torch.zeros(math.ceil(n_q / block), math.ceil(n_k / block), dtype=torch.bool)
    for r, c in mask.nonzero().tolist():
        expected[r // block, c // block] = True
    assert torch.equal(pattern.block_layout(n_q, n_k, block), expected)


@given(pattern=simple_patterns(), n=st.integers(1, 90))
def test_density_and_count_agree_with_the_mask(pattern, n):
    mask = pattern.mask(n, n)
    assert pattern.count(n, n) == int(mask.sum())
    assert pattern.density(n) == pytest.approx(mask.float().mean().item())


def test_named_densities():
    assert Full().density(10) == 1.0
    assert Causal().density(10) == pytest.approx(55 / 100)
    assert SlidingWindow(16).count(100, 100) == sum(min(i + 1, 16) for i in range(100))


def test_band_of_compositions():
    assert (Causal() & SlidingWindow(4, causal=False)).band() == (0, 3)
    assert (SlidingWindow(4) | SlidingWindow(2, causal=False)).band() == (-1, 3)
    gap = Union(SlidingWindow(1, causal=False), Predicate(lambda i, j: j == i - 5))
    assert gap.band() is None


def test_per_head_masks_stack_one_pattern_per_head():
    pattern = PerHead([Causal(), Full(), SlidingWindow(2)])
    mask = pattern.mask(4, 4)
    assert mask.shape == (3, 4, 4)
    for h, p in enumerate(pattern.patterns):
        assert torch.equal(mask[h], p.mask(4, 4))
    assert pattern.block_layout(4, 4, 2).shape == (3, 2, 2)
    assert pattern.density(4) == pytest.approx((10 + 16 + 7) / 48)
    both = pattern & Causal()
    assert both.n_heads == 3 and torch.equal(both.mask(4, 4)[1], Causal().mask(4, 4))


@pytest.mark.parametrize(
    "make, error",
    [
        (lambda: SlidingWindow(0), ValueError),
        (lambda: SlidingWindow(-3), ValueError),
        (lambda: SlidingWindow(2.5), TypeError),
        (lambda: Predicate(3), TypeError),
        (lambda: PerHead([]), ValueError),
        (lambda: PerHead([Causal(), "causal"]), TypeError),
        (lambda: PerHead([Causal()]) | PerHead([Causal(), Full()]), ValueError),
        (lambda: Causal() | "full", TypeError),
        (lambda: Intersection(Causal(), 1), TypeError),
        (lambda: Causal().block_layout(4, 4, 0), ValueError),
        (lambda: Causal().mask(0, 4), ValueError),
        (lambda: Predicate(lambda i, j: i - j).mask(3, 3), TypeError),
        (lambda: Predicate(lambda i, j: torch.ones(5, 5, dtype=torch.bool)).mask(3, 3), TypeError),
    ],
)
def test_bad_pattern_arguments_raise_clear_errors(make, error):
    with pytest.raises(error) as info:
        make()
    assert str(info.value)
