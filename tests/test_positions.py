"""attention() with explicit positions and a key padding mask, and every backend's gradient share.

The oracle here is written out in the test (scores, an explicit mask built from the positions and
the padding, softmax): it does not go through any backend.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit import BlockSparse, Causal, Full, PerHead, Predicate, SlidingWindow, Strided, attention
from attnkit.backends import BY_NAME, Problem, make_problem, pick
from attnkit.backends.sparse import native_bands
from attnkit.kernels import dense as dense_kernel_module
from attnkit.kernels.blockwise import blockwise_kernel

PATTERNS = {
    "full": Full(),
    "causal": Causal(),
    "window": SlidingWindow(3),
    "strided": Strided(3),
    "predicate": Predicate(lambda i, j: (i - j) % 3 != 1),
    "per-head": PerHead([Causal(), SlidingWindow(2)]),
}


def _oracle(q, k, v, pattern, scale, q_pos, k_pos, padding):
    """``(out, lse)`` of the masked softmax, with the mask built from the positions and padding."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    allowed = pattern.rows_mask(q_pos, k_pos)  # (Nq, Nk) or (Hq, Nq, Nk)
    allowed = allowed.expand(q.shape[0], q.shape[1], len(q_pos), len(k_pos))
    if padding is not None:
        allowed = allowed & padding[:, None, None, :]
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, -math.inf)
    seen = allowed.any(-1)
    safe = torch.where(seen.unsqueeze(-1), scores, 0.0)
    weights = torch.where(seen.unsqueeze(-1), torch.softmax(safe, -1), 0.0)
    lse = torch.where(seen, torch.logsumexp(safe, -1), -math.inf)
    return weights @ v, lse


@st.composite
def problems(draw):
    n_kv, groups = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2]))
    n_q, n_k = draw(st.integers(1, 13)), draw(st.integers(1, 13))
    batch, dim = draw(st.integers(1, 2)), draw(st.sampled_from([4, 8]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q, k, v = (torch.randn(batch, h, n, dim, generator=gen, dtype=torch.float64)
               for h, n in ((n_kv * groups, n_q), (n_kv, n_k), (n_kv, n_k)))
    start = draw(st.integers(0, 30))
    q_pos = torch.randperm(40, generator=gen)[:n_q] + start if draw(st.booleans()) else None
    k_pos = torch.arange(start, start + n_k) if draw(st.booleans()) else None
    padding = torch.rand(batch, n_k, generator=gen) < 0.7 if draw(st.booleans()) else None
    name = draw(st.sampled_from(sorted(PATTERNS)))
    if name == "per-head" and q.shape[1] != 2:
        name = "causal"
    return q, k, v, PATTERNS[name], q_pos, k_pos, padding


@settings(max_examples=60, deadline=None)
@given(problem=problems(), backend=st.sampled_from(["auto", "reference", "dense", "blockwise"]))
def test_positions_and_padding_match_the_explicit_mask(problem, backend):
    q, k, v, pattern, q_pos, k_pos, padding = problem
    n_q, n_k = q.shape[2], k.shape[2]
    oracle_q = torch.arange(n_k - n_q, n_k) if q_pos is None else q_pos
    oracle_k = torch.arange(n_k) if k_pos is None else k_pos
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = attention(*leaves, pattern, backend=backend, return_lse=True,
                         q_positions=q_pos, k_positions=k_pos, key_padding_mask=padding)
    expected_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    expected, expected_lse = _oracle(*expected_leaves, pattern, q.shape[-1] ** -0.5, oracle_q, oracle_k, padding)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    assert torch.equal(torch.isinf(lse), torch.isinf(expected_lse))
    torch.testing.assert_close(lse.nan_to_num(neginf=0.0), expected_lse.nan_to_num(neginf=0.0), atol=1e-10, rtol=0)
    d_out = torch.randn_like(out)
    (out * d_out).sum().backward()
    (expected * d_out).sum().backward()
    for name, got, want in zip("qkv", leaves, expected_leaves):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-10, rtol=1e-10, msg=f"d{name}")


def test_rows_that_see_only_padding_give_zeros_and_pass_no_nan_back():
    q, k, v = (torch.randn(2, 2, 5, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    padding = torch.ones(2, 5, dtype=torch.bool)
    padding[1, :3] = False  # left padding: causal rows 0..2 of batch entry 1 see no real key
    out, lse = attention(q, k, v, Causal(), return_lse=True, key_padding_mask=padding)
    assert torch.all(out[1, :, :3] == 0) and torch.all(lse[1, :, :3] == -math.inf)
    assert torch.isfinite(lse[0]).all() and torch.isfinite(lse[1, :, 3:]).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.all(q.grad[1, :, :3] == 0) and torch.all(k.grad[1, :, :3] == 0)


def test_a_nan_in_a_padding_key_reaches_no_row():
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    padding = torch.tensor([[False, True, True, True, True, True]])
    clean = attention(q, k, v, Causal(), key_padding_mask=padding)
    k[0, :, 0] = float("nan")
    v[0, :, 0] = float("inf")
    torch.testing.assert_close(attention(q, k, v, Causal(), key_padding_mask=padding), clean)


def test_a_shard_of_a_block_layout_is_placed_by_its_positions():
    # A BlockSparse layout made for 8 positions, evaluated on 4 keys at positions 4..7.
    layout = torch.ones(4, 4, dtype=torch.bool).tril()
    q, k, v = (torch.randn(1, 1, 4, 8, dtype=torch.float64) for _ in range(3))
    positions = torch.arange(4, 8)
    out = attention(q, k, v, BlockSparse(layout, 2), q_positions=positions, k_positions=positions)
    expected, _ = _oracle(q, k, v, BlockSparse(layout, 2), 8 ** -0.5, positions, positions, None)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backend", ["sparse", "triton"])
def test_backends_that_take_no_positions_say_so(backend):
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match=f"backend '{backend}' cannot run this call: it takes no explicit"):
        attention(q, q, q, Causal(), backend=backend, q_positions=torch.arange(4))
    with pytest.raises(ValueError, match=f"backend '{backend}' cannot run this call: it takes no key_padding_mask"):
        attention(q, q, q, backend=backend, key_padding_mask=torch.ones(1, 4, dtype=torch.bool))


def test_auto_picks_among_the_backends_that_take_the_arguments():
    q = torch.randn(1, 2, 2048, 16)
    positions = torch.arange(2048)
    pattern = Strided(64)
    assert pick(make_problem(q, q, q, pattern, None, False)).name == "sparse"
    assert pick(make_problem(q, q, q, pattern, None, False, positions, positions)).name in ("dense", "blockwise")
    assert pick(make_problem(q, q, q, SlidingWindow(64), None, False, positions, positions)).name == "blockwise"
    padding = torch.ones(1, 2048, dtype=torch.bool)
    assert pick(make_problem(q, q, q, pattern, None, False, key_padding_mask=padding)).name == "dense"


@pytest.mark.parametrize("pattern", [Full(), Causal(), SlidingWindow(4), Strided(3)])
def test_blockwise_hides_padding_in_every_tile(pattern):
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(3, 4, 9, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(3, 2, 13, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    padding = torch.rand(3, 13, generator=gen) < 0.6
    padding[1] = False  # every row of this entry sees only padding
    padding[2, :9] = False  # left padding: causal rows see no real key until late
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = blockwise_kernel(*leaves, pattern, 8 ** -0.5, block_q=2, block_k=3, key_padding_mask=padding)
    expected_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    expected, expected_lse = attention(*expected_leaves, pattern, backend="reference", return_lse=True,
                                       key_padding_mask=padding)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == -math.inf)
    assert torch.equal(torch.isinf(lse), torch.isinf(expected_lse))
    torch.testing.assert_close(lse.nan_to_num(neginf=0.0), expected_lse.nan_to_num(neginf=0.0), atol=1e-12, rtol=0)
    d_out, d_lse = torch.randn_like(out), torch.randn_like(lse)
    ((out * d_out).sum() + (lse.nan_to_num(neginf=0.0) * d_lse).sum()).backward()
    ((expected * d_out).sum() + (expected_lse.nan_to_num(neginf=0.0) * d_lse).sum()).backward()
    for name, got, want in zip("qkv", leaves, expected_leaves):
        assert torch.isfinite(got.grad).all()
        torch.testing.assert_close(got.grad, want.grad, atol=1e-12, rtol=1e-12, msg=f"d{name}")


def test_dense_gives_the_lse_of_a_padded_call_with_unequal_widths():
    # Value width != key width: SDPA returns no LSE, the blockwise kernel computes it with the padding.
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, 6, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 2, 7, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 2, 7, 5, generator=gen, dtype=torch.float64)
    padding = torch.tensor([[True] * 7, [False] * 5 + [True] * 2])
    results = []
    for backend in ("dense", "reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = attention(*leaves, Causal(), backend=backend, return_lse=True, key_padding_mask=padding)
        (out.sum() + lse.nan_to_num(neginf=0.0).sum()).backward()
        results.append((out, lse, *(t.grad for t in leaves)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_auto_runs_a_padded_call_that_dense_refuses_on_blockwise(monkeypatch):
    q = torch.randn(1, 2, 64, 8)
    padding = torch.ones(1, 64, dtype=torch.bool)
    problem = make_problem(q, q, q, Strided(8), None, True, key_padding_mask=padding)
    monkeypatch.setattr(BY_NAME["dense"], "accepts", lambda problem: "its mask would not fit")
    assert pick(problem).name == "blockwise"


def test_reference_refuses_weights_beyond_a_quarter_of_free_memory(monkeypatch):
    monkeypatch.setattr(dense_kernel_module, "free_memory", lambda device: 2**30)
    big = Problem(Causal(), 8192, 8192, 2, batch=2)  # 1 GiB of float32 weights
    assert "would exceed a quarter of the 1.00 GiB free" in BY_NAME["reference"].accepts(big)
    small = Problem(Causal(), 1024, 1024, 2, batch=2)
    assert BY_NAME["reference"].accepts(small) is None


@pytest.mark.parametrize("bad, error, message", [
    (dict(q_positions=torch.arange(4.0)), TypeError, "q_positions must hold integers"),
    (dict(k_positions=torch.arange(5)), ValueError, r"k_positions must have shape \(4,\), got \(5,\)"),
    (dict(q_positions=[0, 1, 2, 3]), TypeError, "q_positions must be a 1-D integer torch.Tensor"),
    (dict(k_positions=torch.arange(4)[None]), ValueError, r"k_positions must have shape \(4,\)"),
    (dict(key_padding_mask=torch.ones(1, 4)), TypeError, "key_padding_mask must be a bool tensor"),
    (dict(key_padding_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError,
     r"key_padding_mask must have shape \(batch, keys\) = \(1, 4\), got \(2, 4\)"),
    (dict(key_padding_mask=torch.ones(1, 4, dtype=torch.bool, device="meta")), ValueError,
     "key_padding_mask must be on cpu"),
])
def test_bad_positions_and_padding_are_named(bad, error, message):
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(error, match=message):
        attention(q, q, q, **bad)


def _shares_match_the_gradient(backend_name, pattern, dtype, dim, split, tolerance):
    """The shares of two key halves, given the merged out and LSE, sum to the autograd gradient
    of the whole call (through out and through the LSE)."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 11, dim, generator=gen, dtype=dtype)
    k, v = (torch.randn(2, 2, 11, dim, generator=gen, dtype=dtype) for _ in range(2))
    d_out, d_lse = torch.randn(2, 4, 11, dim, generator=gen, dtype=dtype), torch.randn(2, 4, 11, generator=gen)
    leaves = [t.clone().double().requires_grad_() for t in (q, k, v)]
    out, lse = attention(*leaves, pattern, backend="reference", return_lse=True)
    ((out * d_out.double()).sum() + (lse * d_lse.double()).sum()).backward()
    backend = BY_NAME[backend_name]
    out, lse = (t.detach().to(dtype) if t.is_floating_point() else t for t in (out, lse))
    lse = lse.float() if dtype != torch.float64 else lse
    d_lse = d_lse.to(lse.dtype)
    q_pos = torch.arange(11)
    total = [torch.zeros_like(t) for t in (q, k, v)]
    for keys in split:
        k_pos = q_pos[keys]
        positions = (q_pos, k_pos) if backend.takes_positions else (None, None)
        problem = make_problem(q, k[:, :, keys], v[:, :, keys], pattern, None, True, *positions)
        shares = backend.grad_share(problem, q, k[:, :, keys], v[:, :, keys], out, lse, d_out, d_lse)
        total[0] += shares[0]
        total[1][:, :, keys] += shares[1]
        total[2][:, :, keys] += shares[2]
    for name, got, leaf in zip("qkv", total, leaves):
        torch.testing.assert_close(got.double(), leaf.grad, atol=tolerance, rtol=tolerance, msg=f"d{name}")


@pytest.mark.parametrize("backend", ["reference", "dense", "blockwise"])
@pytest.mark.parametrize("pattern", [Causal(), SlidingWindow(3), Predicate(lambda i, j: (i + j) % 2 == 0)])
def test_grad_shares_of_two_key_halves_sum_to_the_gradient(backend, pattern):
    _shares_match_the_gradient(backend, pattern, torch.float64, 8, (slice(0, 5), slice(5, 11)), 1e-10)


@pytest.mark.parametrize("pattern", [SlidingWindow(3), Strided(3)])
def test_sparse_grad_share_of_all_keys_is_the_gradient(pattern):
    _shares_match_the_gradient("sparse", pattern, torch.float64, 8, (slice(0, 11),), 1e-10)


@pytest.mark.skipif(not native_bands(Problem(SlidingWindow(3), 11, 11, 2, 16, 16)),
                    reason="the native band kernel does not run bands here")
def test_native_band_grad_share_is_the_gradient():
    _shares_match_the_gradient("sparse", SlidingWindow(3), torch.float32, 16, (slice(0, 11),), 1e-4)
