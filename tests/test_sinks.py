"""Attention sinks in ``attention()``: every backend against an explicit float64 formula that puts
the sink in the softmax as one more column, forward, LSE and gradients of q, k, v and the sinks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit import Causal, Full, Predicate, SlidingWindow, attention
from attnkit.kernels.sinks import with_sinks
from attnkit.patterns import Strided

from strategies import problems

FAST_BACKENDS = ["reference", "dense", "blockwise", "sparse"]


def sink_formula(q, k, v, pattern, sinks, scale=None):
    """``(out, lse)`` by the definition: scores of the allowed keys and the sink logit as one
    softmax over ``Nk + 1`` columns, the sink's column dropped before ``@ v``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    allowed = pattern.mask(q.shape[2], k.shape[2], device=q.device)
    scores = scores.masked_fill(~allowed, float("-inf"))
    sink_column = sinks.to(scores.dtype)[:, None, None].expand(q.shape[0], -1, q.shape[2], 1)
    scores = torch.cat([scores, sink_column], dim=-1)
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - lse.unsqueeze(-1))[..., :-1]
    return weights @ v, lse


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _run(call, q, k, v, sinks, d_out, d_lse):
    q, k, v, sinks = _leaves(q, k, v, sinks)
    out, lse = call(q, k, v, sinks)
    ((out * d_out).sum() + (lse * d_lse).sum()).backward()
    return {"out": out.detach(), "lse": lse.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad, "dsinks": sinks.grad}


def _compare(problem, backend, sinks, tolerance=1e-9):
    q, k, v = problem.q, problem.k, problem.v
    g = torch.Generator().manual_seed(1)
    d_out = torch.randn(*q.shape[:3], v.shape[-1], generator=g, dtype=torch.float64)
    d_lse = torch.randn(q.shape[:3], generator=g, dtype=torch.float64)
    expected = _run(lambda q_, k_, v_, s_: sink_formula(*problem.arranged(q_, k_, v_), problem.pattern, s_),
                    q, k, v, sinks, d_out, d_lse)
    got = _run(lambda q_, k_, v_, s_: attention(*problem.arranged(q_, k_, v_), problem.pattern, backend=backend,
                                                return_lse=True, sinks=s_), q, k, v, sinks, d_out, d_lse)
    for name, want in expected.items():
        torch.testing.assert_close(got[name], want, atol=tolerance, rtol=tolerance,
                                   msg=lambda m, name=name: f"{backend} {problem.describe()} {name}: {m}")


def _sinks(n_heads, seed, spread=2.0):
    return torch.randn(n_heads, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * spread


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@given(problem=problems(max_len=40, max_head_dim=16), seed=st.integers(0, 2**16))
def test_every_backend_equals_the_sink_formula(backend, problem, seed):
    _compare(problem, backend, _sinks(problem.q.shape[1], seed))


@settings(max_examples=6)
@given(problem=problems(max_len=20, max_head_dim=16), seed=st.integers(0, 2**16))
def test_triton_equals_the_sink_formula(problem, seed):
    _compare(problem, "triton", _sinks(problem.q.shape[1], seed))


class _Case:
    """A fixed problem for the tests that name their pattern."""

    def __init__(self, pattern, n_q=9, n_k=13, heads=(4, 2), seed=0):
        g = torch.Generator().manual_seed(seed)
        self.q = torch.randn(2, heads[0], n_q, 8, generator=g, dtype=torch.float64)
        self.k = torch.randn(2, heads[1], n_k, 8, generator=g, dtype=torch.float64)
        self.v = torch.randn(2, heads[1], n_k, 5, generator=g, dtype=torch.float64)
        self.pattern = pattern

    def arranged(self, q, k, v):
        return [q, k, v]

    def describe(self):
        return repr(self.pattern)


def _future_only(i, j):
    return j > i


@pytest.mark.parametrize("backend", FAST_BACKENDS + ["triton"])
def test_rows_without_keys_give_zeros_and_the_sink_as_lse(backend):
    case = _Case(Predicate(_future_only), n_q=6, n_k=6)  # the last row sees no key
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    out, lse = attention(case.q, case.k, case.v, case.pattern, backend=backend, return_lse=True, sinks=sinks)
    assert torch.equal(out[:, :, -1], torch.zeros_like(out[:, :, -1]))
    assert torch.equal(lse[:, :, -1], sinks.expand(2, -1))
    _compare(case, backend, sinks)


@pytest.mark.parametrize("backend", FAST_BACKENDS + ["triton"])
def test_merged_plans_take_the_sink_once(backend):
    """A union the planner runs in several parts merged by ``merge_lse``; a sink joined to each
    part would count twice (and a large sink makes that visible)."""
    case = _Case(SlidingWindow(3) | Strided(4), n_q=20, n_k=20)
    _compare(case, backend, torch.tensor([3.0, -2.0, 1.0, 4.0], dtype=torch.float64))


@pytest.mark.parametrize("pattern", [Full(), Causal(), SlidingWindow(4)], ids=repr)
def test_nq_differs_from_nk_and_gqa(pattern):
    for n_q, n_k, heads in ((3, 11, (6, 2)), (11, 5, (6, 1)), (1, 7, (4, 4))):
        case = _Case(pattern, n_q, n_k, heads, seed=n_q)
        for backend in FAST_BACKENDS:
            _compare(case, backend, _sinks(heads[0], n_k))


def test_half_precision_keeps_float32_statistics():
    case = _Case(Causal(), 16, 16)
    sinks = _sinks(4, 3)
    expected, expected_lse = sink_formula(case.q, case.k, case.v, case.pattern, sinks)
    for dtype in (torch.bfloat16, torch.float16):
        for sink_dtype in (dtype, torch.float32):
            q, k, v = (t.to(dtype) for t in (case.q, case.k, case.v))
            out, lse = attention(q, k, v, Causal(), return_lse=True, sinks=sinks.to(sink_dtype))
            assert out.dtype == dtype and lse.dtype == torch.float32
            torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(lse.double(), expected_lse, atol=2e-2, rtol=2e-2)


def test_a_minus_infinite_sink_is_no_sink_and_rows_without_keys_stay_finite_in_gradients():
    case = _Case(Predicate(_future_only), n_q=6, n_k=6)
    sinks = torch.tensor([float("-inf"), 1.0, float("-inf"), 0.0], dtype=torch.float64, requires_grad=True)
    q, k, v = _leaves(case.q, case.k, case.v)
    out, lse = attention(q, k, v, case.pattern, return_lse=True, sinks=sinks)
    plain, plain_lse = attention(case.q, case.k, case.v, case.pattern, return_lse=True)
    torch.testing.assert_close(out[:, [0, 2]].detach(), plain[:, [0, 2]], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse[:, [0, 2]].detach(), plain_lse[:, [0, 2]], atol=0, rtol=0)
    (out.sum() + lse.masked_fill(torch.isinf(lse), 0).sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, sinks))


def test_with_sinks_without_a_key_or_a_sink_keeps_minus_infinity():
    out, lse = torch.zeros(1, 1, 1, 2, requires_grad=True), torch.full((1, 1, 1), float("-inf"), requires_grad=True)
    sinks = torch.tensor([float("-inf")], requires_grad=True)
    new_out, new_lse = with_sinks(out, lse, sinks)
    assert new_lse.item() == float("-inf") and torch.equal(new_out, torch.zeros_like(new_out))
    (new_out.sum() + new_lse.masked_fill(torch.isinf(new_lse), 0).sum()).backward()
    assert not any(torch.isnan(t.grad).any() for t in (out, lse, sinks))


def test_without_return_lse_the_output_still_has_the_sink():
    case = _Case(Causal(), 5, 5)
    sinks = _sinks(4, 9)
    got = attention(case.q, case.k, case.v, Causal(), sinks=sinks)
    torch.testing.assert_close(got, sink_formula(case.q, case.k, case.v, Causal(), sinks)[0])


@pytest.mark.parametrize(
    "sinks, error, words",
    [
        ([0.0] * 4, TypeError, "sinks must be a 1-D float torch.Tensor"),
        (torch.zeros(4, dtype=torch.int64), TypeError, "sinks must have dtype torch.float64"),
        (torch.zeros(4, dtype=torch.float32), TypeError, "for torch.float64 inputs, got torch.float32"),
        (torch.zeros(3, dtype=torch.float64), ValueError, r"sinks must have shape \(query heads,\) = \(4,\)"),
        (torch.zeros(1, 4, dtype=torch.float64), ValueError, r"got \(1, 4\)"),
        (torch.zeros(4, dtype=torch.float64, device="meta"), ValueError, "sinks must be on cpu"),
    ],
)
def test_bad_sinks_are_refused_by_name(sinks, error, words):
    case = _Case(Causal(), 3, 3)
    with pytest.raises(error, match=words):
        attention(case.q, case.k, case.v, Causal(), sinks=sinks)
