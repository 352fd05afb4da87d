"""The native band kernel against float64 reference_attention: out, LSE, dq, dk, dv, for every
instruction-set build this machine runs (ATTNKIT_NATIVE_ISA), and its dispatch."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from attnkit import Causal, Fixed, PerHead, Predicate, SlidingWindow, Strided, attention
from attnkit.kernels import native_build
from attnkit.kernels import band_native as band_native_module
from attnkit.kernels import sparse as sparse_module
from attnkit.kernels.band_calibration import BandDecision
from attnkit.kernels.band_native import band_forward, band_native_attention, band_native_takes
from attnkit.backends import choose_backend
from attnkit.backends import sparse as sparse_backend
from attnkit.kernels.reference import reference_kernel
from attnkit.kernels.sparse import sparse_kernel

needs_native = pytest.mark.skipif(
    native_build.load_native("band_attention").library is None,
    reason="native band kernel unavailable: " + native_build.load_native("band_attention").message,
)
OTHER_ISAS = ("avx2", "generic")  # besides the default (-march=native) build


def _isa_params(isas: tuple[str, ...]) -> list:
    """One parameter per build, skipped where this machine cannot build or run it."""
    params = []
    for isa in isas:
        built = native_build.load_native("band_attention", isa)
        params.append(pytest.param(isa, marks=pytest.mark.skipif(built.library is None, reason=built.message)))
    return params


def _use_build(isa: str, monkeypatch):
    """Bands take the kernel of the ``isa`` build wherever it can run them (no calibration)."""
    monkeypatch.setenv("ATTNKIT_NATIVE_ISA", isa)
    _decide_native(monkeypatch)
    yield isa


def _decide_native(monkeypatch) -> None:
    """The sparse backend decides for the native kernel wherever it takes the inputs, whatever
    this CPU's calibration says."""
    monkeypatch.setattr(sparse_backend, "band_decision", lambda: BandDecision(True, "the test's choice"))


@pytest.fixture(params=_isa_params(("auto", *OTHER_ISAS)))
def isa(request, monkeypatch):
    """Every build: ``auto`` (-march=native) and the others this machine runs."""
    yield from _use_build(request.param, monkeypatch)


@pytest.fixture(params=_isa_params(OTHER_ISAS))
def other_isa(request, monkeypatch):
    yield from _use_build(request.param, monkeypatch)


# The fixture only selects a build: nothing to reset between hypothesis examples.
few_examples = settings(max_examples=8, suppress_health_check=[HealthCheck.function_scoped_fixture])


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


def _check_on_threads(problem, threads: int) -> None:
    q, k, v, lo, hi, scale, lse_weight = problem
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _assert_matches_reference(q, k, v, lo, hi, scale, lse_weight)
    finally:
        torch.set_num_threads(previous)


@needs_native
@given(problem=band_problems(), threads=st.integers(1, 3))
def test_native_band_is_exact_forward_and_backward(problem, threads):
    _check_on_threads(problem, threads)


@few_examples
@given(problem=band_problems(), threads=st.integers(1, 3))
def test_every_isa_build_is_exact_forward_and_backward(other_isa, problem, threads):
    """The AVX2 and generic builds (narrower vectors, other register blocks) on fewer examples."""
    _check_on_threads(problem, threads)


def test_long_window_over_many_strips_with_gqa(isa):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 1100, 64, generator=gen)
    k, v = (torch.randn(1, 2, 1100, 64, generator=gen) for _ in range(2))
    _assert_matches_reference(q, k, v, 0, 299, 0.125, 1.0)


@pytest.mark.parametrize("n_q", [1, 3, 4])
def test_decoding_sized_calls(n_q, isa):
    """Under 4 queries a strip reads the key rows directly (no transposed copy)."""
    gen = torch.Generator().manual_seed(n_q)
    q = torch.randn(2, 6, n_q, 32, generator=gen)
    k, v = (torch.randn(2, 2, 700, 32, generator=gen) for _ in range(2))
    _assert_matches_reference(q, k, v, 0, 299, 0.2, 1.0)


def test_a_last_strip_of_one_row_after_full_strips(isa):
    """193 queries: strips of 192 rows and then one of a single row, which reads key rows
    directly while the strips before it used transposed copies."""
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 193, 16, generator=gen) for _ in range(3))
    _assert_matches_reference(q, k, v, 0, 99, 0.3, 1.0)


@needs_native
@pytest.mark.parametrize("pattern", [SlidingWindow(4), Strided(3)])
def test_an_empty_batch(pattern):
    q, k, v = (torch.randn(0, 2, 40, 16, requires_grad=True) for _ in range(3))
    for backend in ("sparse", "auto"):
        out, lse = attention(q, k, v, pattern, backend=backend, return_lse=True)
        assert out.shape == (0, 2, 40, 16) and lse.shape == (0, 2, 40)
        out.sum().backward()
        assert q.grad.shape == q.shape


def test_band_wider_than_a_strip(isa):
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 1, 2000, 16, generator=gen) for _ in range(3))
    _assert_matches_reference(q, k, v, -100, 850, 0.3, 1.0)


def test_rows_without_keys_give_zeros_minus_inf_and_zero_gradients(isa):
    q, k, v = (torch.randn(1, 2, n, 16, requires_grad=True) for n in (40, 10, 10))
    out, lse = band_native_attention(q, k, v, (0, 3), 0.5)  # the first 27 queries come before every key
    assert torch.all(out[:, :, :27] == 0) and torch.all(lse[:, :, :27] == float("-inf"))
    (out.sum() + _finite(lse).sum()).backward()
    assert torch.all(q.grad[:, :, :27] == 0) and torch.any(q.grad[:, :, 27:] != 0)


@pytest.mark.parametrize("head_dim", [96, 144, 256])
def test_wide_heads(head_dim, isa):
    gen = torch.Generator().manual_seed(head_dim)
    q, k, v = (torch.randn(1, 2, 90, head_dim, generator=gen) for _ in range(3))
    _assert_matches_reference(q, k, v, -5, 20, head_dim**-0.5, 1.0)


def test_gradients_do_not_depend_on_the_thread_count(isa):
    """Ten backward strips of 200 rows, the shortest allowed for a band of width 200: neighbouring
    strips share keys, strips two apart must not; a race would lose or reorder key gradients."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1, 2000, 16, generator=gen, requires_grad=True) for _ in range(3))
    weights = torch.randn(1, 1, 2000, 16, generator=gen)
    grads = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 3, 3):
            torch.set_num_threads(threads)
            out, _ = band_native_attention(q, k, v, (0, 200), 0.3)
            grads.append(torch.autograd.grad((out * weights).sum(), (q, k, v)))
    finally:
        torch.set_num_threads(previous)
    for other in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], other))
    _assert_matches_reference(q.detach(), k.detach(), v.detach(), 0, 200, 0.3, 1.0)


def test_nan_and_infinite_inputs_show_in_the_output(isa):
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 1, 12, 16, generator=gen) for _ in range(3))
    k[..., 2] = k[..., 2].abs() + 0.1  # so that an infinite q[..., 2] makes +inf scores
    k[0, 0, 3, 0] = float("nan")
    out, _ = band_native_attention(q, k, v, (0, 3), 0.25)
    expected = reference_kernel(q.double(), k.double(), v.double(), SlidingWindow(4), 0.25)[0]
    assert torch.equal(torch.isnan(out).any(-1), torch.isnan(expected).any(-1))
    assert torch.isnan(out).any(-1)[0, 0, 3:7].all() and not torch.isnan(out[0, 0, 7:]).any()
    q[0, 0, 9, 2] = float("inf")
    out, lse = band_native_attention(q, k.nan_to_num(), v, (0, 3), 0.25)
    assert torch.isnan(out[0, 0, 9]).all() and not torch.isfinite(lse[0, 0, 9])


def test_no_grad_and_a_loss_on_the_lse_alone(isa):
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 60, 32, generator=gen) for _ in range(3))
    with torch.no_grad():
        out, lse = band_native_attention(q, k, v, (0, 9), 0.2)
    expected_out, expected_lse = reference_kernel(q.double(), k.double(), v.double(), SlidingWindow(10), 0.2)[:2]
    torch.testing.assert_close(out.double(), expected_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), expected_lse, rtol=1e-5, atol=1e-5)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    expected = torch.autograd.grad(reference_kernel(*leaves, SlidingWindow(10), 0.2)[1].sum(), leaves[:2])
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    actual = torch.autograd.grad(band_native_attention(*leaves, (0, 9), 0.2)[1].sum(), leaves)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-5)
    assert torch.all(actual[2] == 0)  # the LSE does not depend on v


def test_fractional_band_edges_keep_only_whole_offsets(isa):
    q, k, v = (torch.randn(1, 1, 20, 16) for _ in range(3))
    out, lse = band_native_attention(q, k, v, (0.5, 3.7), 0.25)  # i - j in {1, 2, 3}
    expected = reference_kernel(q.double(), k.double(), v.double(), _band(1, 3), 0.25)
    torch.testing.assert_close(out.double(), expected[0], rtol=1e-5, atol=1e-6)
    assert lse[0, 0, 0] == float("-inf")


@needs_native
def test_sparse_backend_sends_float32_bands_to_the_native_kernel(monkeypatch):
    calls = []

    def spy(*args):
        calls.append(args[3])
        return band_native_attention(*args)

    monkeypatch.setattr(sparse_module, "band_native_attention", spy)
    _decide_native(monkeypatch)
    q, k, v = (torch.randn(1, 4, 100, 32) for _ in range(3))
    patterns = [
        SlidingWindow(16),
        SlidingWindow(16) & SlidingWindow(9, causal=False),
        PerHead([SlidingWindow(4), SlidingWindow(4), Causal(), Causal()]),  # heads 0-1 native, 2-3 the plan
    ]
    for pattern in patterns:
        expected = reference_kernel(q.double(), k.double(), v.double(), pattern, 0.25)[0]
        actual = attention(q, k, v, pattern, scale=0.25, backend="sparse")
        torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-6)
    assert calls == [(0, 15), (0, 8), (0, 3)]
    attention(q.double(), k.double(), v.double(), SlidingWindow(16), backend="sparse")  # float64: the plan
    attention(q[..., :8], k[..., :8], v[..., :8], SlidingWindow(16), backend="sparse")  # width 8: the plan
    assert len(calls) == 3


@needs_native
def test_the_sparse_kernel_runs_the_native_kernel_only_when_told(monkeypatch):
    """The kernel decides nothing: ``native_bands`` is its caller's decision, and the sparse
    backend's decision (here: the planner) is what reaches it."""
    calls = []

    def spying(kernel):
        return lambda *args: calls.append(args[3]) or kernel(*args)

    monkeypatch.setattr(sparse_module, "band_native_attention", spying(band_native_attention))
    monkeypatch.setattr(sparse_module, "band_forward", spying(band_forward))
    monkeypatch.setattr(sparse_backend, "band_decision", lambda: BandDecision(False, "the test's choice"))
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    for pattern in (SlidingWindow(8), Strided(4)):
        expected = reference_kernel(q.double(), k.double(), v.double(), pattern, 0.25)[0]
        by_backend = attention(q, k, v, pattern, scale=0.25, backend="sparse")
        for actual in (sparse_kernel(q, k, v, pattern, 0.25)[0], by_backend):
            torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-6)
        assert calls == []
    for pattern in (SlidingWindow(8), Strided(4)):
        expected = reference_kernel(q.double(), k.double(), v.double(), pattern, 0.25)[0]
        actual = sparse_kernel(q, k, v, pattern, 0.25, native_bands=True)[0]
        torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-6)
    assert calls == [(0, 7), (0, 4)]  # the window whole, Strided's band piece


@st.composite
def plans_with_a_band_part(draw):
    stride = draw(st.integers(1, 12))
    return draw(st.sampled_from([
        Strided(stride),
        Strided(stride) | SlidingWindow(draw(st.integers(1, 40))),
        SlidingWindow(draw(st.integers(1, 30))) | Fixed(stride, 1),
        PerHead([*Strided(stride).parts, Strided(stride), Fixed(stride, 1)]),
    ]))


@few_examples
@given(pattern=plans_with_a_band_part(), n=st.integers(1, 300), extra_queries=st.integers(-40, 40),
       lse_weight=st.sampled_from([0.0, 1.0]), strided_q=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_band_parts_of_a_plan_run_natively_and_exactly(isa, pattern, n, extra_queries, lse_weight, strided_q, seed):
    calls = []
    spy = mock.patch.object(sparse_module, "band_forward", lambda *a: calls.append(a[3]) or band_forward(*a))
    gen = torch.Generator().manual_seed(seed)
    n_q = max(1, n + extra_queries)  # more queries than keys: early rows see nothing
    q = torch.randn(2, 4, n_q, 16, generator=gen)
    if strided_q:  # a non-contiguous view with the same values
        q = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    k, v = (torch.randn(2, 2, n, 16, generator=gen) for _ in range(2))
    expected = _outputs_and_grads(
        lambda *t: reference_kernel(*t, pattern, 0.3)[:2], q.double(), k.double(), v.double(), lse_weight
    )
    with spy:
        actual = _outputs_and_grads(
            lambda *t: attention(*t, pattern, scale=0.3, backend="sparse", return_lse=True), q, k, v, lse_weight
        )
    for name, a, e in zip(["out", "lse", "dq", "dk", "dv"], actual, expected):
        a, e = _finite(a.detach()).double(), _finite(e.detach())
        assert float((a - e).abs().max()) <= 2e-5 * max(float(e.abs().max()), 1.0), name
    assert calls, "the band part should run natively"


@needs_native
def test_auto_sends_every_float32_window_to_the_native_kernel():
    cpu = torch.device("cpu")
    for window in (128, 4096):  # a window as long as the sequence still beats masked SDPA
        assert choose_backend(SlidingWindow(window), 4096, 4096, cpu, need_lse=False, native_band=True) == "sparse"
    assert choose_backend(SlidingWindow(4096), 4096, 4096, cpu, need_lse=False) == "dense"
    assert choose_backend(Causal(), 4096, 4096, cpu, need_lse=False, native_band=True) == "dense"
    # decoding: one query against a window of most keys is one SDPA call; a short window is not
    assert choose_backend(SlidingWindow(2048), 1, 2048, cpu, need_lse=False, native_band=True) == "dense"
    assert choose_backend(SlidingWindow(256), 1, 4096, cpu, need_lse=False, native_band=True) == "sparse"
    wide = SlidingWindow(1500, causal=False)  # the last query sees 1500 of 4096 keys
    assert choose_backend(wide, 1, 4096, cpu, need_lse=False, native_band=True) == "sparse"
    mixed = PerHead([SlidingWindow(4096), Causal()])  # not every head is a band: the plan's rule
    assert choose_backend(mixed, 4096, 4096, cpu, need_lse=False, n_q_heads=2, native_band=True) == "dense"
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    expected = reference_kernel(q.double(), k.double(), v.double(), SlidingWindow(64), 0.25)[0]
    torch.testing.assert_close(attention(q, k, v, SlidingWindow(64), scale=0.25).double(), expected, rtol=1e-5, atol=1e-6)


def test_takes_only_float32_cpu_and_widths_of_sixteen():
    cpu = torch.device("cpu")
    assert not band_native_takes(cpu, torch.float64, 16, 16)
    assert not band_native_takes(cpu, torch.float32, 8, 8)
    assert not band_native_takes(cpu, torch.float32, 16, 32)
    assert not band_native_takes(torch.device("meta"), torch.float32, 16, 16)


@pytest.mark.parametrize("change, message", [
    (lambda q, k, v: (q.double(), k.double(), v.double()), "q must be a float32 CPU tensor"),
    (lambda q, k, v: (q.half(), k.half(), v.half()), "q must be a float32 CPU tensor"),
    (lambda q, k, v: (q[..., :8], k[..., :8], v[..., :8]), "multiple of 16"),
    (lambda q, k, v: (q[:, :1], k, v), r"query heads \(1\) must be a multiple of key/value heads \(2\)"),
    (lambda q, k, v: (q, k, v[:, :, :3]), "k and v must agree in batch, heads and seq"),
    (lambda q, k, v: (q[0], k[0], v[0]), "q must have rank 4"),
])
def test_bad_inputs_are_rejected_with_the_reason(change, message):
    q, k, v = torch.randn(1, 4, 6, 16), torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16)
    with pytest.raises(ValueError, match="band_native_attention: .*" + message):
        band_native_attention(*change(q, k, v), (0, 2), 1.0)


def test_infinite_band_is_rejected():
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="band must be two finite numbers"):
        band_native_attention(q, q, q, (0, float("inf")), 1.0)
