"""Packed documents (attnkit.Document): the pattern, its errors, its pieces and plan, every backend
against the float64 reference (out, LSE, dq, dk, dv), and the RoPE positions helper."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, strategies as st

from attnkit import Causal, Document, Predicate, SlidingWindow, attention, document_positions
from attnkit.backends import REGISTRY
from attnkit.kernels.band_native import band_native_takes
from attnkit.kernels.sparse import sparse_kernel
from attnkit.kernels.sparse_plan import document_piece, plan_documents
from attnkit.nn import RotaryEmbedding
from attnkit.patterns import Piece

NAMES = ("out", "lse", "dq", "dk", "dv")


def _backends() -> list:
    """Every registered backend and ``auto``; Triton's interpreter is slow (tests/test_documents_triton.py)."""
    params = []
    for backend in REGISTRY:
        interpreted = backend.name == "triton" and not torch.cuda.is_available()
        params.append(pytest.param(backend.name, marks=[pytest.mark.slow] if interpreted else []))
    return [*params, "auto"]


@st.composite
def lengths(draw, min_total: int = 1, max_total: int = 40) -> list[int]:
    """Document lengths with empty and 1-token documents among them, summing to at least ``min_total``."""
    sizes = draw(st.lists(st.sampled_from([0, 1, 1, 2, 3, 5, 8, 13]), min_size=1, max_size=8))
    while sum(sizes) < min_total:
        sizes.append(draw(st.integers(1, 13)))
    while sum(sizes) > max_total:
        sizes.pop()
    return sizes if sum(sizes) >= min_total else sizes + [min_total - sum(sizes)]


def _with_band(kind: str, doc: Document, window: int):
    if kind == "alone":
        return doc
    if kind == "causal":
        return Causal() & doc
    if kind == "window":
        return SlidingWindow(window) & doc
    if kind == "two-sided":
        return doc & SlidingWindow(window, causal=False)
    return Piece(1, math.inf) & doc  # strictly earlier keys: each document's first row sees nothing


@st.composite
def document_problems(draw, dims=(4, 16)):
    sizes = draw(lengths())
    n_k = sum(sizes)
    n_q = draw(st.sampled_from([n_k, n_k, max(1, n_k // 2), 1]))
    kv_heads, groups = draw(st.sampled_from([(1, 1), (2, 1), (1, 3), (2, 2)]))
    batch, dim = draw(st.integers(1, 2)), draw(st.sampled_from(dims))
    kind = draw(st.sampled_from(["alone", "causal", "window", "two-sided", "strict"]))
    pattern = _with_band(kind, Document(sizes), draw(st.integers(1, 6)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    q = torch.randn(batch, kv_heads * groups, n_q, dim, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(batch, kv_heads, n_k, dim, generator=gen, dtype=torch.float64) for _ in range(2))
    return q, k, v, pattern


def _run(q, k, v, pattern, run):
    """(out, lse, dq, dk, dv) with a loss that reaches the LSE too; ``run(q, k, v) -> (out, lse)``."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = run(*leaves)
    gen = torch.Generator().manual_seed(1)
    w_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    w_lse = torch.randn(lse.shape, generator=gen, dtype=torch.float64)
    loss = (out.double() * w_out).sum() + (torch.where(torch.isinf(lse), 0.0, lse.double()) * w_lse).sum()
    return (out, lse, *torch.autograd.grad(loss, leaves))


def _reference(q, k, v, pattern):
    return _run(q, k, v, pattern, lambda *t: attention(*t, pattern, backend="reference", return_lse=True))


def _assert_close(actual, expected, what: str, rtol: float, atol: float) -> None:
    for name, a, e in zip(NAMES, actual, expected):
        assert torch.equal(torch.isinf(a), torch.isinf(e)), f"{name}: -inf rows differ ({what})"
        torch.testing.assert_close(
            torch.where(torch.isinf(a), 0.0, a.double()), torch.where(torch.isinf(e), 0.0, e.double()),
            rtol=rtol, atol=atol, msg=lambda m: f"{name} ({what}): {m}",
        )


@pytest.mark.parametrize("backend", _backends())
@given(problem=document_problems())
def test_every_backend_equals_the_float64_reference(backend, problem):
    q, k, v, pattern = problem
    expected = _reference(q, k, v, pattern)
    actual = _run(q, k, v, pattern, lambda *t: attention(*t, pattern, backend=backend, return_lse=True))
    _assert_close(actual, expected, f"{backend}, {pattern}, Nq={q.shape[2]}", 1e-9, 1e-10)


@pytest.mark.parametrize("native", [False, True])
@given(problem=document_problems(dims=(16,)))
def test_the_document_plan_is_exact_on_both_kernels(native, problem):
    q, k, v, pattern = problem
    if native:  # the native band kernel takes float32 and widths that are multiples of 16
        if not band_native_takes(torch.device("cpu"), torch.float32, 16, 16):
            pytest.skip("the native band kernel is not built here")
        q, k, v = (t.float().double() for t in (q, k, v))  # representable in float32
    dtype = torch.float32 if native else torch.float64
    scale = q.shape[-1] ** -0.5
    expected = _reference(q, k, v, pattern)

    def run(q_, k_, v_):
        return sparse_kernel(q_.to(dtype), k_.to(dtype), v_.to(dtype), pattern, scale, native_bands=native)

    tolerance = (2e-5, 2e-5) if native else (1e-9, 1e-10)
    _assert_close(_run(q, k, v, pattern, run), expected, f"native={native}, {pattern}", *tolerance)


def test_documents_with_a_predicate_and_fully_masked_rows():
    # Not one piece: the general planner runs it, exactly (each document's last row sees nothing).
    pattern = Document([3, 1, 0, 4]) & Predicate(lambda i, j: j > i)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    expected = _reference(q, k, v, pattern)
    assert torch.isinf(expected[1][0, 0, [2, 3, 7]]).all()
    for backend in ("sparse", "blockwise", "dense", "auto"):
        actual = _run(q, k, v, pattern, lambda *t: attention(*t, pattern, backend=backend, return_lse=True))
        _assert_close(actual, expected, backend, 1e-9, 1e-10)


def test_allows_pairs_of_one_document_only_and_positions_outside_none():
    doc = Document([2, 0, 3])
    mask = doc.mask(5, 5)
    expected = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 1, 1, 1]])
    assert torch.equal(mask, expected.bool())
    assert not doc.allows(torch.tensor([-1, 5]), torch.tensor([-1, 5])).any()
    assert torch.equal((Causal() & doc).mask(3, 5), expected.bool()[2:].tril(2))


def test_from_cu_seqlens_equals_lengths_and_gives_the_bounds_back():
    doc = Document.from_cu_seqlens(torch.tensor([0, 3, 3, 7], dtype=torch.int32))
    assert doc == Document([3, 0, 4]) and doc.bounds == (0, 3, 3, 7) and doc.total == 7
    assert Document(torch.tensor([2, 5])).lengths == (2, 5)


@pytest.mark.parametrize("lengths, error, words", [
    ([3, -1], ValueError, "lengths must be non-negative, got -1"),
    ([], ValueError, "lengths must hold at least one document"),
    ([1.5, 2], TypeError, "lengths must hold ints, got float"),
    ([True, 2], TypeError, "lengths must hold ints, got bool"),
    ("12", TypeError, "lengths must be a list of ints"),
    (7, TypeError, "lengths must be a list of ints"),
    (torch.tensor([1.0, 2.0]), TypeError, "lengths must be a 1-D integer tensor"),
])
def test_bad_lengths_raise_naming_the_argument(lengths, error, words):
    with pytest.raises(error, match="Document: " + words):
        Document(lengths)


@pytest.mark.parametrize("cu_seqlens, error, words", [
    ([1, 3], ValueError, "must start at 0"),
    ([0, 3, 2], ValueError, "must not decrease, got 3 then 2 at index 2"),
    ([0], ValueError, "must hold at least two bounds"),
    ([0, 2.0], TypeError, "must hold ints"),
    (torch.zeros(2, 2, dtype=torch.long), TypeError, "must be a 1-D integer tensor"),
])
def test_bad_cu_seqlens_raise_naming_the_argument(cu_seqlens, error, words):
    with pytest.raises(error, match="cu_seqlens " + words):
        Document.from_cu_seqlens(cu_seqlens)


@pytest.mark.parametrize("backend", ["auto", "sparse", "reference", "blockwise", "dense"])
def test_lengths_that_do_not_cover_the_keys_raise_at_call_time(backend):
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match=r"Document: lengths must sum to the number of keys \(6\), got 5"):
        attention(q, torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 8), Causal() & Document([2, 3]), backend=backend)


def test_pieces_meet_bands_and_the_planner_reads_them():
    doc = Document([4, 1, 3])
    assert (Causal() & doc).pieces == (Piece(0, math.inf, documents=(0, 4, 5, 8)),)
    assert (SlidingWindow(2) & doc).pieces == (Piece(0, 1, documents=(0, 4, 5, 8)),)
    assert (Causal() & doc).parts is not None and doc.band() is None
    assert (doc & Document([8])).pieces is None  # two different cuts are not one piece
    assert document_piece(Causal() & doc) == Piece(0, math.inf, documents=(0, 4, 5, 8))
    with pytest.raises(ValueError, match="Piece: documents must not decrease"):
        Piece(0, 1, documents=(0, 3, 2))


def test_the_plan_covers_each_documents_band_and_nothing_across():
    doc = Document([5, 0, 1, 3, 5, 2])
    for pattern in (Causal() & doc, SlidingWindow(2) & doc, doc):
        for n_q in (16, 9, 1):
            plan = plan_documents(document_piece(pattern), n_q, 16)
            assert plan.computed_pairs == pattern.count(n_q, 16)
            rows = sorted(s + r for g in plan.groups for s in g.q_starts for r in range(g.n_q))
            assert rows == list(range(n_q))  # every query row in exactly one unit
    plan = plan_documents(document_piece(Causal() & doc), 16, 16)
    assert {(g.n_q, len(g.q_starts)) for g in plan.groups} == {(5, 2), (1, 1), (3, 1), (2, 1)}


def test_a_long_plan_is_built_without_an_n_by_n_tensor():
    lengths = [512 + (997 * d) % 3585 for d in range(40)]
    pattern = Causal() & Document(lengths)
    plan = plan_documents(document_piece(pattern), sum(lengths), sum(lengths))
    assert plan.computed_pairs == sum(n * (n + 1) // 2 for n in lengths)


def test_document_positions_restart_in_each_document():
    assert document_positions([3, 0, 2, 1]).tolist() == [0, 1, 2, 0, 1, 0]
    assert Document([2, 2]).positions().tolist() == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="document_positions: lengths must be non-negative"):
        document_positions([2, -2])


def test_packed_documents_with_rope_equal_each_document_alone():
    lengths = [5, 1, 0, 7, 3]
    rope = RotaryEmbedding(8, theta=100.0)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, sum(lengths), 8, generator=gen, dtype=torch.float64) for _ in range(3))
    q_rot, k_rot = rope(q, k, document_positions(lengths))
    packed = attention(q_rot, k_rot, v, Causal() & Document(lengths), backend="sparse")
    start = 0
    for n in lengths:
        if n:
            rows = slice(start, start + n)
            q_d, k_d = rope(q[:, :, rows], k[:, :, rows], torch.arange(n))
            alone = attention(q_d, k_d, v[:, :, rows], Causal(), backend="reference")
            torch.testing.assert_close(packed[:, :, rows], alone, rtol=1e-12, atol=1e-12)
        start += n
