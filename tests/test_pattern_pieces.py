"""``Pattern.pieces``: each pattern declares its geometry once, as disjoint pieces whose union is the
pattern; the CPU planner (and the Triton kernels) run those pieces."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from attnkit import attention, reference_attention
from attnkit.kernels.sparse import sparse_plan_pairs
from attnkit.patterns import (
    SUMMARY,
    BlockLocal,
    BlockSparse,
    Causal,
    Fixed,
    Full,
    Intersection,
    Periodic,
    PerHead,
    Piece,
    Predicate,
    SlidingWindow,
    Strided,
    Summary,
    Union,
)

INF = math.inf
_LAYOUT = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)  # 3 blocks of 4 keys

LEAVES = [
    Full(), Causal(), SlidingWindow(3), SlidingWindow(2, causal=False), Strided(1), Strided(4), Fixed(4, 1),
    Fixed(3, 3), Periodic(3), BlockLocal(5), Summary(4, 2), Summary(3, 3), BlockSparse(_LAYOUT, 4),
    Predicate(lambda i, j: j == i),
]
compositions = st.recursive(
    st.sampled_from(LEAVES),
    lambda inner: st.tuples(st.sampled_from([Union, Intersection]), inner, inner).map(lambda t: t[0](t[1], t[2])),
    max_leaves=3,
)


def _positions(draw_ints: list[int]) -> torch.Tensor:
    return torch.tensor(draw_ints, dtype=torch.long)


@settings(max_examples=200, deadline=None)
@given(compositions, st.lists(st.integers(-30, 40), min_size=1, max_size=25),
       st.lists(st.integers(0, 40), min_size=1, max_size=25))
def test_pieces_are_disjoint_and_their_union_is_the_pattern(pattern, q_pos, k_pos):
    pieces = pattern.pieces
    if pieces is None:
        return
    q_pos, k_pos = _positions(q_pos), _positions(k_pos)  # any positions, negative queries included
    covered = torch.zeros(len(q_pos), len(k_pos), dtype=torch.int64)
    for piece in pieces:
        assert piece.pieces == (piece,)
        covered += piece.rows_mask(q_pos, k_pos).long()
    assert int(covered.max()) <= 1, "pieces overlap"
    assert torch.equal(covered.bool(), pattern.rows_mask(q_pos, k_pos))


@pytest.mark.parametrize(
    "pattern, pieces",
    [
        (Full(), (Piece(-INF, INF),)),
        (Causal(), (Piece(0, INF),)),
        (SlidingWindow(3), (Piece(0, 2),)),
        (SlidingWindow(3, causal=False), (Piece(-2, 2),)),
        (Causal() & SlidingWindow(2, causal=False), (Piece(0, 1),)),
        (SlidingWindow(3) | SlidingWindow(2, causal=False), (Piece(-1, 2),)),
        (Strided(4), (Piece(0, 4), Piece(2, INF, step=4))),
        (Periodic(3), (Piece(0, INF, step=3),)),
        (Fixed(4, 1), (Piece(0, 3, segment=4), Piece(0, INF, keys=SUMMARY, period=4, width=1))),
        (BlockLocal(5), (Piece(0, 4, segment=5),)),
        (Summary(4, 2), (Piece(0, INF, keys=SUMMARY, period=4, width=2, own=True),)),
        (BlockLocal(8) & SlidingWindow(3), (Piece(0, 2, segment=8),)),
        (SlidingWindow(3, causal=False) & BlockLocal(8), (Piece(0, 2, segment=8),)),
        (BlockLocal(8) & BlockLocal(8), (Piece(0, 7, segment=8),)),
        (BlockLocal(8) & BlockLocal(4), None),
        (Periodic(3) & SlidingWindow(9), None),
        (Strided(4) & Causal(), None),
        (Strided(4) | SlidingWindow(2), None),
        (BlockSparse(_LAYOUT, 4), None),
        (Predicate(lambda i, j: j == i), None),
        (PerHead([SlidingWindow(3), SlidingWindow(3)]), None),
        (PerHead([SlidingWindow(3), SlidingWindow(3)]) & SlidingWindow(2), None),
    ],
    ids=repr,
)
def test_pieces_of_each_family(pattern, pieces):
    assert pattern.pieces == pieces


def _summary_oracle(piece: Piece, i: int, j: int) -> bool:
    """The docstring's coordinates, written out position by position."""
    first = piece.period - piece.width
    if j % piece.period < first:
        return False
    b = sum(1 for x in range(j) if x % piece.period >= first)  # summary keys before j
    if i < 0:
        u = -1
    else:
        block_start = (i // piece.period) * piece.period
        limit = i + 1 if piece.own else block_start
        u = sum(1 for x in range(limit) if x % piece.period >= first) - 1
    return piece.lo <= u - b <= piece.hi


@pytest.mark.parametrize("piece", [
    Piece(0, INF, keys=SUMMARY, period=4, width=2, own=True),
    Piece(0, INF, keys=SUMMARY, period=5, width=1),
    Piece(1, 3, keys=SUMMARY, period=3, width=2, own=True),
    Piece(-2, 0, keys=SUMMARY, period=4, width=4),
])
def test_summary_coordinates_follow_the_docstring(piece):
    q_pos, k_pos = torch.arange(-6, 30), torch.arange(30)
    expected = torch.tensor([[_summary_oracle(piece, int(i), int(j)) for j in k_pos] for i in q_pos])
    assert torch.equal(piece.rows_mask(q_pos, k_pos), expected)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(lo=0, hi=3, step=0), ValueError, "Piece: step must be a positive integer"),
    (dict(lo=0, hi=3, segment=-1), ValueError, "Piece: segment must be a positive integer"),
    (dict(lo=0, hi=3, keys="dense"), ValueError, "Piece: keys must be 'lattice' or 'summary'"),
    (dict(lo=0, hi=INF, keys=SUMMARY, period=2, width=3), ValueError, r"width must be at most period \(2\)"),
    (dict(lo=0, hi=INF, keys=SUMMARY, period=4, width=1, segment=4), ValueError, "summary keys take no step"),
    (dict(lo=math.nan, hi=3), TypeError, "Piece: lo must be a number"),
    (dict(lo=0, hi="3"), TypeError, "Piece: hi must be a number"),
    (dict(lo=0, hi=3, own=1), TypeError, "Piece: own must be True or False"),
])
def test_bad_pieces_are_refused_by_name(kwargs, error, message):
    with pytest.raises(error, match=message):
        Piece(**kwargs)


@st.composite
def pieces(draw) -> Piece:
    if draw(st.booleans()):
        period = draw(st.integers(1, 9))
        lo = draw(st.sampled_from([-INF, -3, 0, 1, 4]))
        return Piece(lo, draw(st.sampled_from([INF, lo + 2 if math.isfinite(lo) else 5])), keys=SUMMARY,
                     period=period, width=draw(st.integers(1, period)), own=draw(st.booleans()))
    lo = draw(st.integers(-12, 12))
    hi = draw(st.sampled_from([INF, lo, lo + 1, lo + 7, lo - 1]))  # lo - 1: an empty piece
    return Piece(draw(st.sampled_from([lo, -INF])), hi, step=draw(st.integers(1, 5)),
                 segment=draw(st.sampled_from([0, 0, 3, 16])))


@given(pieces(), st.integers(1, 70), st.integers(-20, 20), st.integers(0, 2**31 - 1))
def test_the_planner_runs_any_piece_exactly(piece, n_k, extra_queries, seed):
    gen = torch.Generator().manual_seed(seed)
    n_q = max(1, n_k + extra_queries)
    q = torch.randn(2, 2, n_q, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 1, n_k, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out = attention(q, k, v, piece, backend="sparse")
    expected, _ = reference_attention(q, k, v, piece)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))
    for actual, wanted in zip(grads, expected_grads):
        torch.testing.assert_close(actual, wanted, rtol=1e-9, atol=1e-11)


def test_a_block_local_window_is_planned_as_its_band():
    # BlockLocal(256) & SlidingWindow(16) meet in one piece, narrower than its blocks: the
    # planner computes no more than for the window alone, not the 256 x 256 blocks around it
    # (eight times as many pairs).
    n = 2048
    pattern = BlockLocal(256) & SlidingWindow(16)
    assert sparse_plan_pairs(pattern, n, n) <= sparse_plan_pairs(SlidingWindow(16), n, n)
    q, k, v = (torch.randn(1, 2, 300, 16, dtype=torch.float64) for _ in range(3))
    small = BlockLocal(64) & SlidingWindow(9)
    torch.testing.assert_close(attention(q, k, v, small, backend="sparse"), reference_attention(q, k, v, small)[0])
