"""The native band kernel against float64 reference_attention: out, LSE, dq, dk, dv; its build and dispatch."""

from __future__ import annotations

import shutil

import pytest
import torch
from hypothesis import given, strategies as st

from attnkit import Causal, PerHead, Predicate, SlidingWindow, attention
from attnkit.kernels import native
from attnkit.kernels import sparse as sparse_module
from attnkit.kernels.band_native import band_native_attention, band_native_supports
from attnkit.kernels.reference import reference_kernel

needs_native = pytest.mark.skipif(
    native.load_native("band_attention").library is None,
    reason="native band kernel unavailable: " + native.load_native("band_attention").message,
)


def _finite(lse: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(lse), lse, 0.0)


def _band(lo: int, hi: int) -> Predicate:
    return Predicate(lambda i, j: (i - j >= lo) & (i - j <= hi))


def _outputs_and_grads(run, q, k, v, lse_weight: float):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = run(*leaves)
    gen = torch.Generator().manual_seed(1)  # the same weights in every dtype: drawn in float64
    loss = (out * torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)).sum()
    lse_weights = torch.randn(lse.shape, generator=gen, dtype=torch.float64).to(lse.dtype)
    loss = loss + lse_weight * (_finite(lse) * lse_weights).sum()
    return (out, lse, *torch.autograd.grad(loss, leaves))


def _assert_matches_reference(q, k, v, lo, hi, scale, lse_weight):
    """float32 native against float64 reference; errors relative to each tensor's largest entry."""
    expected = _outputs_and_grads(
        lambda *t: reference_kernel(*t, _band(lo, hi), scale)[:2], q.double(), k.double(), v.double(), lse_weight
    )
    actual = _outputs_and_grads(lambda *t: band_native_attention(*t, (lo, hi), scale), q, k, v, lse_weight)
    assert torch.equal(torch.isinf(actual[1]), torch.isinf(expected[1])), "rows without keys"
    for name, a, e in zip(["out", "lse", "dq", "dk", "dv"], actual, expected):
        assert a.dtype == torch.float32
        a, e = _finite(a.detach()).double(), _finite(e.detach())
        bound = 2e-5 * max(float(e.abs().max()), 1.0)
        error = float((a - e).abs().max())
        assert error <= bound, f"{name}: max error {error:.3g} > {bound:.3g}"


@st.composite
def band_problems(draw):
    n_kv_heads, groups = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    long = draw(st.booleans())  # longer than one strip of 256 rows: strips run in two rounds
    n_k = draw(st.integers(257, 620) if long else st.integers(1, 90))
    n_q = draw(st.one_of(st.just(n_k), st.integers(1, n_k), st.integers(1, n_k + 40)))
    lo = draw(st.integers(-60, 40))
    hi = lo + draw(st.integers(-3, 300 if long else 60))  # lo > hi: an empty band
    head_dim = draw(st.sampled_from([16, 32, 48, 64, 80] if not long else [16]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    batch = draw(st.integers(1, 2))
    q = torch.randn(batch, n_kv_heads * groups, n_q, head_dim, generator=gen) * 1.5
    k = torch.randn(batch, n_kv_heads, n_k, head_dim, generator=gen) * 1.5
    v = torch.randn(batch, n_kv_heads, n_k, head_dim, generator=gen)
    return q, k, v, lo, hi, draw(st.sampled_from([0.05, 0.25, 1.0])), draw(st.sampled_from([0.0, 1.0]))


@needs_native
@given(problem=band_problems(), threads=st.integers(1, 3))
def test_native_band_is_exact_forward_and_backward(problem, threads):
    q, k, v, lo, hi, scale, lse_weight = problem
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _assert_matches_reference(q, k, v, lo, hi, scale, lse_weight)
    finally:
        torch.set_num_threads(previous)


@needs_native
def test_long_window_over_many_strips_with_gqa():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 1100, 64, generator=gen)
    k, v = (torch.randn(1, 2, 1100, 64, generator=gen) for _ in range(2))
    _assert_matches_reference(q, k, v, 0, 299, 0.125, 1.0)


@needs_native
def test_band_wider_than_a_strip():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 1, 2000, 16, generator=gen) for _ in range(3))
    _assert_matches_reference(q, k, v, -100, 850, 0.3, 1.0)


@needs_native
def test_rows_without_keys_give_zeros_minus_inf_and_zero_gradients():
    q, k, v = (torch.randn(1, 2, n, 16, requires_grad=True) for n in (40, 10, 10))
    out, lse = band_native_attention(q, k, v, (0, 3), 0.5)  # the first 27 queries come before every key
    assert torch.all(out[:, :, :27] == 0) and torch.all(lse[:, :, :27] == float("-inf"))
    (out.sum() + _finite(lse).sum()).backward()
    assert torch.all(q.grad[:, :, :27] == 0) and torch.any(q.grad[:, :, 27:] != 0)


@needs_native
def test_backward_is_deterministic():
    q, k, v = (torch.randn(1, 2, 700, 32, requires_grad=True) for _ in range(3))
    grads = []
    for _ in range(2):
        out, _ = band_native_attention(q, k, v, (0, 300), 0.2)
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@needs_native
def test_sparse_backend_sends_float32_bands_to_the_native_kernel(monkeypatch):
    calls = []

    def spy(*args):
        calls.append(args[3])
        return band_native_attention(*args)

    monkeypatch.setattr(sparse_module, "band_native_attention", spy)
    q, k, v = (torch.randn(1, 4, 100, 32) for _ in range(3))
    attention(q, k, v, SlidingWindow(16), backend="sparse")
    attention(q, k, v, SlidingWindow(16) & SlidingWindow(9, causal=False), backend="sparse")
    attention(q, k, v, PerHead([SlidingWindow(4), SlidingWindow(4), Causal(), Causal()]), backend="sparse")
    assert calls == [(0, 15), (0, 8), (0, 3)]
    attention(q.double(), k.double(), v.double(), SlidingWindow(16), backend="sparse")  # float64: the plan
    attention(q[..., :8], k[..., :8], v[..., :8], SlidingWindow(16), backend="sparse")  # width 8: the plan
    assert len(calls) == 3


def test_supports_only_float32_cpu_and_widths_of_sixteen():
    q = torch.randn(1, 1, 4, 16)
    assert not band_native_supports(q.double(), q.double(), q.double())
    assert not band_native_supports(q[..., :8], q[..., :8], q[..., :8])
    assert not band_native_supports(q, q, torch.randn(1, 1, 4, 32))


def test_infinite_band_is_rejected():
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="band must be finite"):
        band_native_attention(q, q, q, (0, float("inf")), 1.0)


def test_disabled_or_failed_builds_fall_back_with_a_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNKIT_CACHE_DIR", str(tmp_path))
    try:
        monkeypatch.setenv("ATTNKIT_NATIVE", "0")
        native.load_native.cache_clear()
        assert native.load_native("band_attention") == native.NativeLibrary(None, "disabled by ATTNKIT_NATIVE=0")
        assert not band_native_supports(*(torch.randn(1, 1, 4, 16) for _ in range(3)))
        monkeypatch.setenv("ATTNKIT_NATIVE", "1")
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        native.load_native.cache_clear()
        status = native.load_native("band_attention")
        assert status.library is None and "no-such-compiler" in status.message
        q, k, v = (torch.randn(1, 2, 50, 16) for _ in range(3))  # the plan still runs
        expected = reference_kernel(q.double(), k.double(), v.double(), SlidingWindow(5), 0.25)[0]
        actual = attention(q, k, v, SlidingWindow(5), backend="sparse")
        torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-6)
    finally:
        native.load_native.cache_clear()


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler here")
def test_the_library_builds_where_a_compiler_exists(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("ATTNKIT_NATIVE", raising=False)
    monkeypatch.delenv("CC", raising=False)
    try:
        native.load_native.cache_clear()
        status = native.load_native("band_attention")
        assert status.library is not None, status.message
        assert [p.suffix for p in tmp_path.iterdir()] == [".so"]  # no temporary files left behind
        assert native.native_status() == {"band_attention": status.message}
    finally:
        native.load_native.cache_clear()
