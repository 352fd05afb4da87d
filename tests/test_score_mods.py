"""Score modifications (softcap, alibi, distance_bias, a Python callable) in every backend that
takes them, against a float64 oracle written out here: output, LSE, dq, dk, dv and the
gradients of slopes / table."""

from __future__ import annotations

import contextlib
import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings, strategies as st

import attnkit
from attnkit import Causal, Document, Full, PerHead, SlidingWindow, Strided, attention
from attnkit.backends import make_problem
from attnkit.backends.registry import BY_NAME
from attnkit.backends import sparse as sparse_backend
from attnkit.kernels import native_build
from attnkit.kernels import sparse as sparse_module
from attnkit.kernels.band_calibration import BandDecision
from attnkit.kernels.band_native import band_native_takes

KINDS = ("softcap", "alibi", "distance_bias")
BACKENDS = ("reference", "blockwise", "dense", "sparse", "auto")


def oracle(q, k, v, pattern, kind, parameter, scale, q_pos, k_pos):
    """``(out, lse)`` by the formulas of the issue, element by element over the square."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    s = q @ k.transpose(-1, -2) * scale  # (B, Hq, Nq, Nk)
    i, j = q_pos[:, None], k_pos[None, :]
    if kind == "softcap":
        s = parameter * torch.tanh(s / parameter)
    elif kind == "alibi":
        s = s + parameter[:, None, None] * (j - i)
    elif kind == "distance_bias":
        s = s + parameter[:, (i - j).abs().clamp(max=parameter.shape[1] - 1)]
    allowed = pattern.rows_mask(q_pos, k_pos)
    s = s.masked_fill(~allowed, -math.inf)
    seen = allowed.expand(s.shape).any(-1)
    lse = torch.where(seen, torch.logsumexp(torch.where(seen[..., None], s, 0.0), -1), -math.inf)
    probs = torch.where(seen[..., None], torch.exp(s - torch.where(seen, lse, 0.0)[..., None]), 0.0)
    return probs @ v, lse


def make_mod(kind, parameter):
    return {"softcap": attnkit.softcap, "alibi": attnkit.alibi, "distance_bias": attnkit.distance_bias}[kind](parameter)


def _loss(out, lse):
    gen = torch.Generator().manual_seed(1)
    w_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    w_lse = torch.randn(lse.shape, generator=gen, dtype=torch.float64)
    return (out * w_out).sum() + (torch.where(torch.isinf(lse), 0.0, lse) * w_lse).sum()


def _parameter(draw, kind: str, n_q_heads: int, gen: torch.Generator, widest_table: int):
    """A cap (small ones bend the scores), slopes ``(Hq,)`` or a table ``(Hq, R)``."""
    if kind == "softcap":
        return draw(st.sampled_from([0.5, 2.0, 30.0]))
    if kind == "alibi":
        return torch.rand(n_q_heads, generator=gen, dtype=torch.float64)
    return torch.randn(n_q_heads, draw(st.integers(1, widest_table)), generator=gen, dtype=torch.float64)


@st.composite
def cases(draw):
    batch, n_kv_heads, groups = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    n_k = draw(st.integers(1, 70))
    n_q = draw(st.one_of(st.just(n_k), st.integers(1, n_k), st.integers(1, 70)))  # Nq > Nk: rows see no key
    dim = draw(st.sampled_from([3, 8, 16]))
    pattern = draw(st.sampled_from([Full(), Causal(), SlidingWindow(5), SlidingWindow(9, causal=False),
                                    Strided(4), Causal() & SlidingWindow(17)]))
    kind = draw(st.sampled_from(KINDS))
    explicit = draw(st.booleans())
    if not explicit and draw(st.booleans()):  # packed documents, empty and 1-token ones included
        cuts = sorted(draw(st.lists(st.integers(0, n_k), max_size=4)))
        pattern = pattern & Document([b - a for a, b in zip([0, *cuts], [*cuts, n_k])])
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    n_q_heads = n_kv_heads * groups
    # Large scores, so that softcap bends them (tanh far from linear).
    q = 3 * torch.randn(batch, n_q_heads, n_q, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, n_kv_heads, n_k, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, n_kv_heads, n_k, dim, generator=gen, dtype=torch.float64)
    parameter = _parameter(draw, kind, n_q_heads, gen, widest_table=12)
    positions = None
    if explicit:  # a shard of a longer sequence: positions shuffled and far from 0
        positions = (1000 + torch.randperm(n_q + n_k, generator=gen)[:n_q], 1000 + torch.randperm(n_q + n_k, generator=gen)[:n_k])
    return q, k, v, pattern, kind, parameter, positions


def _check(backend, case, dtype=torch.float64, tolerance=(1e-9, 1e-10)):
    q, k, v, pattern, kind, parameter, positions = case
    if not BY_NAME.get(backend, BY_NAME["reference"]).takes_positions:
        positions = None
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    grads_of = list(leaves)
    if isinstance(parameter, torch.Tensor):
        parameter = parameter.to(dtype).requires_grad_()
        grads_of.append(parameter)
    q_pos, k_pos = positions if positions is not None else (None, None)
    out, lse = attention(*leaves, pattern, backend=backend, return_lse=True, score_mod=make_mod(kind, parameter),
                         q_positions=q_pos, k_positions=k_pos)
    actual = (out, lse, *torch.autograd.grad(_loss(out, lse), grads_of))

    e_leaves = [t.to(dtype).double().requires_grad_() for t in (q, k, v)]
    e_grads_of = list(e_leaves)
    e_parameter = parameter
    if isinstance(parameter, torch.Tensor):
        e_parameter = parameter.detach().double().requires_grad_()
        e_grads_of.append(e_parameter)
    n_q, n_k = q.shape[2], k.shape[2]
    if positions is None:
        positions = (torch.arange(n_k - n_q, n_k), torch.arange(n_k))
    e_out, e_lse = oracle(*e_leaves, pattern, kind, e_parameter, q.shape[-1] ** -0.5, *positions)
    expected = (e_out, e_lse, *torch.autograd.grad(_loss(e_out, e_lse), e_grads_of))
    rtol, atol = tolerance
    for name, a, e in zip(("out", "lse", "dq", "dk", "dv", "d_parameter"), actual, expected):
        a = a.double()
        assert torch.equal(torch.isinf(a), torch.isinf(e)), name
        torch.testing.assert_close(torch.where(torch.isinf(a), 0.0, a), torch.where(torch.isinf(e), 0.0, e),
                                   rtol=rtol, atol=atol, msg=lambda m: f"{name} ({backend}, {kind}, {pattern!r}): {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None)
@given(case=cases())
def test_score_mod_equals_the_float64_formula(backend, case):
    q, k, v, pattern, kind, parameter, positions = case
    if backend == "dense" and kind == "softcap":
        return  # dense refuses it: test_dense_refuses_softcap_and_auto_routes_around_it
    mod = make_mod(kind, parameter)
    if backend == "sparse" and BY_NAME["sparse"].accepts(make_problem(q, k, v, pattern, None, True, score_mod=mod)):
        assert "Document" in repr(pattern)  # its document kernel applies no score mod yet
        with pytest.raises(ValueError, match="does not apply a score_mod to Document patterns yet"):
            _check(backend, case)
        return
    _check(backend, case)


@st.composite
def native_cases(draw):
    """Float32 bands the native kernel runs: head dims that are multiples of 16, windows, GQA."""
    batch, n_kv_heads, groups = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    n_k = draw(st.integers(1, 300))
    n_q = draw(st.one_of(st.just(n_k), st.integers(1, n_k), st.integers(1, 300)))
    pattern = draw(st.sampled_from([SlidingWindow(1), SlidingWindow(7), SlidingWindow(40), SlidingWindow(9, causal=False),
                                    SlidingWindow(300)]))
    n_q_heads = n_kv_heads * groups
    if draw(st.booleans()):  # a per-head pattern: runs of heads, each its own slice of the parameter
        pattern = PerHead([draw(st.sampled_from([SlidingWindow(3), SlidingWindow(20)])) for _ in range(n_q_heads)])
    kind = draw(st.sampled_from(KINDS))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q = 3 * torch.randn(batch, n_q_heads, n_q, 16, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(batch, n_kv_heads, n_k, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    return q, k, v, pattern, kind, _parameter(draw, kind, n_q_heads, gen, widest_table=50), None


def _isa_params() -> list:
    """One parameter per build of the native kernel, skipped where this machine cannot run it."""
    params = []
    for isa in ("auto", "avx2", "generic"):
        built = native_build.load_native("band_attention", isa)
        params.append(pytest.param(isa, marks=pytest.mark.skipif(built.library is None, reason=built.message)))
    return params


@contextlib.contextmanager
def native_kernel(isa: str):
    """The sparse backend runs bands by the ``isa`` build of the native kernel, whatever this CPU's
    calibration says."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ATTNKIT_NATIVE_ISA", isa)
        patch.setattr(sparse_backend, "band_decision", lambda: BandDecision(True, "the test's choice"))
        assert band_native_takes(torch.device("cpu"), torch.float32, 16, 16)
        yield


@pytest.mark.parametrize("isa", _isa_params())
@settings(max_examples=25, deadline=None)
@given(case=native_cases())
def test_native_band_kernel_applies_score_mods_in_float32(isa, case):
    with native_kernel(isa), mock.patch.object(sparse_module, "_portable", side_effect=AssertionError("planner ran")):
        _check("sparse", case, torch.float32, (2e-4, 2e-4))


def _inputs(n_q=12, n_k=12, heads=4, kv_heads=2, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(1, heads, n_q, dim, generator=gen, dtype=torch.float64),
            torch.randn(1, kv_heads, n_k, dim, generator=gen, dtype=torch.float64),
            torch.randn(1, kv_heads, n_k, dim, generator=gen, dtype=torch.float64))


def test_dense_refuses_softcap_and_auto_routes_around_it():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="dense.*softcap"):
        attention(q, k, v, Causal(), backend="dense", score_mod=attnkit.softcap(5.0))
    problem = make_problem(q, k, v, Causal(), None, False, score_mod=attnkit.softcap(5.0))
    assert BY_NAME["dense"].accepts(problem) is not None
    expected = attention(q, k, v, Causal(), backend="reference", score_mod=attnkit.softcap(5.0))
    torch.testing.assert_close(attention(q, k, v, Causal(), score_mod=attnkit.softcap(5.0)), expected)


def test_softcap_changes_the_result_and_hidden_pairs_stay_hidden():
    q, k, v = _inputs()
    q = q * 10
    plain = attention(q, k, v, Causal(), backend="blockwise")
    capped, lse = attention(q, k, v, Causal(), backend="blockwise", score_mod=attnkit.softcap(1.0), return_lse=True)
    assert (plain - capped).abs().max() > 1e-3
    # The first query sees one key: weight 1 whatever the cap (a hidden pair would take -cap, not -inf).
    torch.testing.assert_close(capped[:, :, 0], v.repeat_interleave(2, 1)[:, :, 0])


def test_fully_masked_rows_give_zeros_and_minus_inf():
    q, k, v = _inputs(n_q=6, n_k=3)  # Nq > Nk: the first three rows sit before every key
    slopes = torch.ones(4, dtype=torch.float64)
    for backend in BACKENDS:
        out, lse = attention(q, k, v, Causal(), backend=backend, score_mod=attnkit.alibi(slopes), return_lse=True)
        assert torch.equal(out[:, :, :3], torch.zeros_like(out[:, :, :3])), backend
        assert torch.isinf(lse[:, :, :3]).all() and (lse[:, :, :3] < 0).all(), backend


def test_python_callable_runs_on_reference_and_dense_with_gradients():
    q, k, v = _inputs()
    weight = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)

    def mod(s, b, h, i, j):
        return s * torch.sigmoid(weight * (h + 1)) - 0.01 * (i - j).abs()

    results = {}
    for backend in ("reference", "dense", "auto"):
        out = attention(q, k, v, SlidingWindow(4), backend=backend, score_mod=mod)
        results[backend] = (out, torch.autograd.grad(out.square().sum(), weight)[0])
    oracle_table = torch.stack([-0.01 * torch.arange(12.0, dtype=torch.float64)] * 4)
    out_scaled = attention(q * torch.sigmoid(0.3 * torch.arange(1, 5.0, dtype=torch.float64)).view(1, 4, 1, 1), k, v,
                           SlidingWindow(4), backend="reference", score_mod=attnkit.distance_bias(oracle_table))
    for backend, (out, grad) in results.items():
        torch.testing.assert_close(out, out_scaled, msg=backend)
        torch.testing.assert_close(grad, results["reference"][1], msg=backend)
    assert results["reference"][1] != 0
    for backend in ("blockwise", "sparse"):
        with pytest.raises(ValueError, match="callable runs only on backend='reference' or 'dense'"):
            attention(q, k, v, Causal(), backend=backend, score_mod=mod)


def test_grad_share_returns_the_parameter_gradient_of_each_key_part():
    """Two halves of the keys: their shares of every gradient, the table's included, sum to the
    whole call's gradient (what ring attention and merged plans rely on)."""
    q, k, v = _inputs(n_q=10, n_k=16)
    table = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    mod = attnkit.distance_bias(table)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = attention(*leaves, Causal(), backend="reference", score_mod=mod, return_lse=True)
    d_out, d_lse = torch.randn_like(out), torch.randn_like(lse)
    expected = torch.autograd.grad((out * d_out).sum() + (lse * d_lse).sum(), [*leaves, table])
    q_pos, k_pos = torch.arange(6, 16), torch.arange(16)
    for backend in ("reference", "blockwise", "dense"):
        total_params = torch.zeros_like(table)
        d_q = torch.zeros_like(q)
        for keys in (slice(0, 7), slice(7, 16)):
            problem = make_problem(q, k[:, :, keys], v[:, :, keys], Causal(), None, True, q_pos, k_pos[keys],
                                   score_mod=mod)
            shares = BY_NAME[backend].grad_share(problem, q, k[:, :, keys], v[:, :, keys], out.detach(), lse.detach(),
                                                 d_out, d_lse)
            torch.testing.assert_close(shares.dk, expected[1][:, :, keys], msg=backend)
            total_params += shares.params[0]
            d_q += shares.dq
        torch.testing.assert_close(d_q, expected[0], msg=backend)
        torch.testing.assert_close(total_params, expected[3], msg=backend)


def test_grad_share_without_parameters_has_empty_params():
    q, k, v = _inputs()
    out, lse = attention(q, k, v, Causal(), return_lse=True)
    problem = make_problem(q, k, v, Causal(), None, True)
    shares = BY_NAME["blockwise"].grad_share(problem, q, k, v, out, lse, torch.ones_like(out), None)
    assert shares.params == () and len(shares) == 4


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: attnkit.softcap(0.0), "cap must be finite and positive"),
        (lambda: attnkit.softcap(-1.0), "cap must be finite and positive"),
        (lambda: attnkit.softcap(float("inf")), "cap must be finite and positive"),
        (lambda: attnkit.softcap(float("nan")), "cap must be finite and positive"),
        (lambda: attnkit.softcap("5"), "cap must be a real number"),
        (lambda: attnkit.alibi([1.0, 2.0]), "slopes must be a tensor"),
        (lambda: attnkit.alibi(torch.ones(4, dtype=torch.int64)), "slopes must be a floating-point tensor"),
        (lambda: attnkit.alibi(torch.ones(4, 1)), r"slopes must be a non-empty tensor of shape \(H,\)"),
        (lambda: attnkit.distance_bias(torch.ones(4)), r"table must be a non-empty tensor of shape \(H, R\)"),
        (lambda: attnkit.distance_bias(torch.ones(4, 0)), r"table must be a non-empty tensor of shape \(H, R\)"),
        (lambda: attention(*_inputs(), score_mod=attnkit.alibi(torch.ones(3, dtype=torch.float64))),
         r"slopes must have one entry per query head \(4\)"),
        (lambda: attention(*_inputs(), score_mod=attnkit.distance_bias(torch.ones(2, 5, dtype=torch.float64))),
         r"table must have one entry per query head \(4\)"),
        (lambda: attention(*_inputs(), score_mod=attnkit.alibi(torch.ones(4, device="meta"))),
         "slopes is on meta but q is on cpu"),
        (lambda: attention(*_inputs(), score_mod=42), "score_mod must be a ScoreMod or a callable"),
    ],
)
def test_bad_arguments_name_the_argument(make, message):
    with pytest.raises((TypeError, ValueError), match=message):
        make()


def test_callable_returning_a_wrong_shape_is_refused():
    with pytest.raises(ValueError, match="score_mod callable must return a tensor"):
        attention(*_inputs(), backend="reference", score_mod=lambda s, b, h, i, j: s.sum())


@pytest.mark.parametrize("kind", KINDS)
def test_native_grad_share_returns_the_parameter_gradient(kind):
    """The sparse backend's share through the native kernel (what merged plans and ring steps
    take), given the call's own LSE, is the whole gradient, the parameter's included."""
    gen = torch.Generator().manual_seed(3)
    q = 2 * torch.randn(2, 4, 50, 16, generator=gen)
    k, v = (torch.randn(2, 2, 50, 16, generator=gen) for _ in range(2))
    parameter = {"softcap": 3.0, "alibi": torch.rand(4, generator=gen),
                 "distance_bias": torch.randn(4, 9, generator=gen)}[kind]
    mod = make_mod(kind, parameter)
    pattern = PerHead([SlidingWindow(5), SlidingWindow(5), SlidingWindow(12), SlidingWindow(30)])
    with native_kernel("auto"):
        problem = make_problem(q, k, v, pattern, None, True, score_mod=mod)
        assert sparse_backend.native_bands(problem)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        params = list(problem.parameters())
        for p in params:
            p.requires_grad_()
        out, lse = attention(*leaves, pattern, backend="reference", return_lse=True, score_mod=mod)
        d_out, d_lse = torch.randn(out.shape, generator=gen), torch.randn(lse.shape, generator=gen)
        expected = torch.autograd.grad((out * d_out).sum() + (lse * d_lse).sum(), leaves + params)
        shares = BY_NAME["sparse"].grad_share(problem, q, k, v, out.detach(), lse.detach(), d_out, d_lse)
    for actual, wanted in zip((*shares[:3], *shares.params), expected):
        torch.testing.assert_close(actual, wanted, rtol=2e-4, atol=2e-4)
    assert len(shares.params) == len(params)


def test_padding_and_per_head_patterns_with_a_bias_agree_across_backends():
    q, k, v = _inputs(n_q=9, n_k=14)
    q, k, v = (t.expand(3, -1, -1, -1).clone() for t in (q, k, v))
    padding = torch.ones(3, 14, dtype=torch.bool)
    padding[1, 10:] = False
    padding[2, :] = False  # every key is padding: zeros and -inf
    pattern = PerHead([Causal(), SlidingWindow(3), Full(), SlidingWindow(6, causal=False)])
    table = torch.randn(4, 5, dtype=torch.float64)
    results = {}
    for backend in ("reference", "blockwise", "dense", "auto"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        parameter = table.clone().requires_grad_()
        out, lse = attention(*leaves, pattern, backend=backend, return_lse=True, key_padding_mask=padding,
                             score_mod=attnkit.distance_bias(parameter))
        results[backend] = (out, lse, *torch.autograd.grad(_loss(out, lse), [*leaves, parameter]))
    assert torch.isinf(results["reference"][1][2]).all()
    for backend, result in results.items():
        for a, e in zip(result, results["reference"]):
            torch.testing.assert_close(a, e, msg=backend)


def test_dense_refuses_a_bias_in_half_precision():
    q, k, v = (t.to(torch.bfloat16) for t in _inputs())
    mod = attnkit.alibi(torch.ones(4))
    with pytest.raises(ValueError, match="round the score_mod's bias to torch.bfloat16"):
        attention(q, k, v, Causal(), backend="dense", score_mod=mod)
    expected = attention(q, k, v, Causal(), backend="reference", score_mod=mod)
    torch.testing.assert_close(attention(q, k, v, Causal(), score_mod=mod), expected, rtol=2e-2, atol=2e-2)
