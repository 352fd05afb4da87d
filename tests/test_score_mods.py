"""Score modifications (softcap, alibi, distance_bias, a Python callable) in every backend that
takes them, against a float64 oracle written out here: output, LSE, dq, dk, dv and the
gradients of slopes / table."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import attnkit
from attnkit import Causal, Full, SlidingWindow, Strided, attention
from attnkit.backends import make_problem
from attnkit.backends.registry import BY_NAME

KINDS = ("softcap", "alibi", "distance_bias")
BACKENDS = ("reference", "blockwise", "dense", "auto")


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
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    n_q_heads = n_kv_heads * groups
    # Large scores, so that softcap bends them (tanh far from linear).
    q = 3 * torch.randn(batch, n_q_heads, n_q, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, n_kv_heads, n_k, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, n_kv_heads, n_k, dim, generator=gen, dtype=torch.float64)
    if kind == "softcap":
        parameter = draw(st.sampled_from([0.5, 2.0, 30.0]))
    elif kind == "alibi":
        parameter = torch.rand(n_q_heads, generator=gen, dtype=torch.float64)
    else:
        parameter = torch.randn(n_q_heads, draw(st.integers(1, 12)), generator=gen, dtype=torch.float64)
    positions = None
    if explicit:  # a shard of a longer sequence: positions shuffled and far from 0
        positions = (1000 + torch.randperm(n_q + n_k, generator=gen)[:n_q], 1000 + torch.randperm(n_q + n_k, generator=gen)[:n_k])
    return q, k, v, pattern, kind, parameter, positions


def _check(backend, case):
    q, k, v, pattern, kind, parameter, positions = case
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    grads_of = list(leaves)
    if isinstance(parameter, torch.Tensor):
        parameter = parameter.clone().requires_grad_()
        grads_of.append(parameter)
    q_pos, k_pos = positions if positions is not None else (None, None)
    out, lse = attention(*leaves, pattern, backend=backend, return_lse=True, score_mod=make_mod(kind, parameter),
                         q_positions=q_pos, k_positions=k_pos)
    actual = (out, lse, *torch.autograd.grad(_loss(out, lse), grads_of))

    e_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    e_grads_of = list(e_leaves)
    e_parameter = parameter
    if isinstance(parameter, torch.Tensor):
        e_parameter = parameter.detach().clone().requires_grad_()
        e_grads_of.append(e_parameter)
    n_q, n_k = q.shape[2], k.shape[2]
    if positions is None:
        positions = (torch.arange(n_k - n_q, n_k), torch.arange(n_k))
    e_out, e_lse = oracle(*e_leaves, pattern, kind, e_parameter, q.shape[-1] ** -0.5, *positions)
    expected = (e_out, e_lse, *torch.autograd.grad(_loss(e_out, e_lse), e_grads_of))
    for name, a, e in zip(("out", "lse", "dq", "dk", "dv", "d_parameter"), actual, expected):
        assert torch.equal(torch.isinf(a), torch.isinf(e)), name
        torch.testing.assert_close(torch.where(torch.isinf(a), 0.0, a), torch.where(torch.isinf(e), 0.0, e),
                                   rtol=1e-9, atol=1e-10, msg=lambda m: f"{name} ({backend}, {kind}, {pattern!r}): {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None)
@given(case=cases())
def test_score_mod_equals_the_float64_formula(backend, case):
    q, k, v, pattern, kind, parameter, positions = case
    if backend == "dense" and kind == "softcap":
        return  # dense refuses it: test_dense_refuses_softcap_and_auto_routes_around_it
    _check(backend, case)


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
