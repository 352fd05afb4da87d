"""``Pattern.parts``: the planned decomposition every pattern reports, which the sparse planner and
``auto`` read instead of a list of pattern types."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from attnkit.backends import Problem
from attnkit.backends.facts import planned
from attnkit.kernels.sparse_plan import split_parts
from attnkit.patterns import (
    BlockLocal,
    BlockSparse,
    Causal,
    Difference,
    Fixed,
    Full,
    Intersection,
    Pattern,
    Periodic,
    PerHead,
    Predicate,
    SlidingWindow,
    Strided,
    Summary,
    Union,
)

N_K = 12
_LAYOUT = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)  # 3 blocks of 4 keys


def _diagonal(i, j):
    return j == i


LEAVES = [
    Full(), Causal(), SlidingWindow(3), SlidingWindow(2, causal=False), Strided(4), Fixed(4, 1),
    Periodic(3), BlockLocal(5), Summary(4, 2), BlockSparse(_LAYOUT, 4), Predicate(_diagonal),
]


def _old_rule(p: Pattern) -> bool:
    """The planner's former hand-kept rule (``_PLANNED`` in functional.py), kept as the oracle."""
    if p.band() is not None:
        band = p.band()
        return math.isfinite(band[0]) and math.isfinite(band[1])
    if isinstance(p, (Strided, Fixed, Periodic, BlockLocal, Summary, BlockSparse)):
        return True
    return isinstance(p, Union) and _old_rule(p.left) and _old_rule(p.right)


compositions = st.recursive(
    st.sampled_from(LEAVES),
    lambda inner: st.tuples(st.sampled_from([Union, Intersection]), inner, inner).map(lambda t: t[0](t[1], t[2])),
    max_leaves=4,
)


@settings(max_examples=150, deadline=None)
def _sparse_planned(pattern, n_q_heads):
    """Whether the sparse backend counts ``pattern`` as planned (every head has parts)."""
    return planned(Problem(pattern, 64, 64, n_q_heads))


@given(compositions)
def test_planned_exactly_where_the_former_type_rule_said_so(pattern):
    assert (pattern.parts is not None) == _old_rule(pattern)
    assert _sparse_planned(pattern, 1) == _old_rule(pattern)


@settings(max_examples=150, deadline=None)
@given(compositions, st.sampled_from([(N_K, N_K), (5, N_K), (1, N_K)]))
def test_parts_are_planned_pieces_whose_union_is_the_pattern(pattern, sizes):
    parts = pattern.parts
    if parts is None:
        return
    union = torch.zeros(sizes, dtype=torch.bool)
    for part in parts:
        assert part.parts == (part,)  # each piece gets one geometry of the planner
        union |= part.mask(*sizes)
    assert torch.equal(union, pattern.mask(*sizes))


@pytest.mark.parametrize(
    "pattern, parts",
    [
        (Strided(4), (SlidingWindow(5), Periodic(4))),
        (Fixed(4, 1), (BlockLocal(4), Summary(4, 1))),
        (Periodic(3), (Periodic(3),)),
        (BlockLocal(5), (BlockLocal(5),)),
        (Summary(4, 2), (Summary(4, 2),)),
        (SlidingWindow(3), (SlidingWindow(3),)),
        (Causal() & SlidingWindow(2, causal=False), (Causal() & SlidingWindow(2, causal=False),)),
        (Strided(4) | SlidingWindow(2), (SlidingWindow(5), Periodic(4), SlidingWindow(2))),
        (Periodic(2) | Fixed(3, 1), (Periodic(2), BlockLocal(3), Summary(3, 1))),
        (Full(), None),
        (Causal(), None),
        (Causal() | SlidingWindow(3), None),
        (Causal() | Strided(4), None),
        (Strided(4) & Causal(), None),
        (Predicate(_diagonal), None),
        (PerHead([Strided(4), SlidingWindow(3)]), None),
    ],
    ids=repr,
)
def test_parts_of_each_family(pattern, parts):
    assert pattern.parts == parts


def test_block_sparse_is_one_part_and_per_head_layouts_plan_per_head():
    single = BlockSparse(_LAYOUT, 4)
    assert single.parts == (single,)
    per_head = BlockSparse(torch.stack([_LAYOUT, _LAYOUT.T]), 4)
    assert _sparse_planned(per_head, 2)
    assert not _sparse_planned(PerHead([Strided(4), Causal()]), 2)
    assert _sparse_planned(PerHead([Strided(4), SlidingWindow(3)]), 2)


def test_planner_splits_by_pieces_and_keeps_patterns_without_pieces_whole():
    assert split_parts(Strided(4) | Fixed(4, 1)) == [*Strided(4).pieces, *Fixed(4, 1).pieces]
    assert split_parts(Causal()) == list(Causal().pieces)
    difference = Difference(Strided(4), Causal())
    assert difference.parts is None and difference.pieces is None and split_parts(difference) == [difference]


def test_planner_splits_a_union_by_its_sides_when_one_side_has_no_pieces():
    # Predicate | Strided has no planned decomposition (auto does not plan it), but a forced
    # sparse call must still give Strided's pieces their own geometry rather than tiling the union.
    sink = Predicate(_diagonal)
    union = sink | Strided(4)
    assert union.parts is None and union.pieces is None
    assert split_parts(union) == [sink, *Strided(4).pieces]
    assert split_parts(Causal() | Fixed(4, 1)) == [*Causal().pieces, *Fixed(4, 1).pieces]
