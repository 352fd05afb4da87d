"""The sparse planner against float64 reference_attention: out, LSE, dq, dk, dv, on every pattern."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

from attnkit import (
    BlockSparse,
    Causal,
    Fixed,
    PerHead,
    Predicate,
    SlidingWindow,
    Strided,
    attention,
)
from attnkit.bench.runner import largest_tensor_bytes
from attnkit.backends import choose_backend
from attnkit.kernels import sparse as sparse_module
from attnkit.kernels.reference import reference_kernel
from attnkit.kernels.sparse import sparse_plan_pairs, sparse_kernel
from attnkit.kernels.sparse_plan import plan_sparse
from attnkit.patterns import BlockLocal, Periodic, Summary
from strategies import LAYOUTS, arrange


@st.composite
def sparse_patterns(draw, n_k: int):
    stride = draw(st.integers(1, 12))
    kind = draw(st.sampled_from(
        ["window", "strided", "fixed", "block_sparse", "part", "union", "intersection", "causal"]
    ))
    if kind == "window":
        return SlidingWindow(draw(st.integers(1, 40)), causal=draw(st.booleans()))
    if kind == "strided":
        return Strided(stride)
    if kind == "fixed":
        return Fixed(stride, draw(st.integers(1, stride)))
    if kind == "block_sparse":
        n_blocks = -(-n_k // stride)
        return BlockSparse(torch.rand(n_blocks, n_blocks, generator=_gen(draw)) < 0.4, stride)
    if kind == "part":
        return draw(st.sampled_from([Periodic(stride), BlockLocal(stride), Summary(stride, 1)]))
    if kind == "union":
        return Strided(stride) | SlidingWindow(draw(st.integers(1, 30)))
    if kind == "intersection":
        return Fixed(stride, 1) & SlidingWindow(draw(st.integers(1, 30)))
    return Causal()


def _gen(draw) -> torch.Generator:
    return torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))


@st.composite
def sparse_problems(draw):
    n_kv_heads, groups = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    n_q_heads = n_kv_heads * groups
    n_k = draw(st.integers(1, 90))
    n_q = draw(st.one_of(st.just(n_k), st.integers(1, n_k), st.integers(1, 100)))
    head_dim = draw(st.sampled_from([4, 8]))
    value_dim = draw(st.sampled_from([head_dim, head_dim, 3]))  # equal widths take the fused path
    if draw(st.booleans()):
        pattern = PerHead([draw(sparse_patterns(n_k)) for _ in range(n_q_heads)])
    else:
        pattern = draw(sparse_patterns(n_k))
    gen = _gen(draw)
    batch = draw(st.integers(1, 2))
    q = torch.randn(batch, n_q_heads, n_q, head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, n_kv_heads, n_k, head_dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, n_kv_heads, n_k, value_dim, generator=gen, dtype=torch.float64)
    layouts = tuple(draw(st.sampled_from(LAYOUTS)) for _ in range(3))
    return q, k, v, pattern, draw(st.sampled_from([4, 8, 16, 128])), draw(st.booleans()), layouts


def _finite(lse: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(lse), lse, 0.0)


def _outputs_and_grads(run, q, k, v, lse_weight, layouts=("contiguous",) * 3, contiguous=False):
    """Outputs and gradients of ``run`` on views of ``q, k, v`` in ``layouts`` (``contiguous``:
    on copies of those views), gradients with respect to the tensors the views are made from."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    inputs = [arrange(t, layout) for t, layout in zip(leaves, layouts)]
    out, lse = run(*(t.contiguous() for t in inputs) if contiguous else inputs)
    gen = torch.Generator().manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum()
    loss = loss + lse_weight * (_finite(lse) * torch.randn(lse.shape, generator=gen, dtype=lse.dtype)).sum()
    grads = torch.autograd.grad(loss, leaves)
    return (out, lse, *grads)


@given(problem=sparse_problems())
def test_sparse_plan_is_exact_forward_and_backward(problem):
    q, k, v, pattern, unit_rows, lse_gradient, layouts = problem
    expected = _outputs_and_grads(
        lambda *t: reference_kernel(*t, pattern, 0.37)[:2], q, k, v, float(lse_gradient), layouts, True
    )
    actual = _outputs_and_grads(
        lambda *t: sparse_kernel(*t, pattern, 0.37, unit_rows=unit_rows), q, k, v, float(lse_gradient), layouts
    )
    assert torch.equal(torch.isinf(actual[1]), torch.isinf(expected[1])), "rows without keys"
    for name, a, e in zip(["out", "lse", "dq", "dk", "dv"], actual, expected):
        torch.testing.assert_close(_finite(a), _finite(e), rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("pattern", [SlidingWindow(48), Strided(16), Fixed(16, 4)])
def test_portable_path_matches_the_fused_path(monkeypatch, pattern):
    q, k, v = (torch.randn(1, 4, 150, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    fused = _outputs_and_grads(lambda *t: sparse_kernel(*t, pattern, 0.3), q, k[:, :2], v[:, :2], 1.0)
    monkeypatch.setattr(sparse_module, "_FUSED", None)
    portable = _outputs_and_grads(lambda *t: sparse_kernel(*t, pattern, 0.3), q, k[:, :2], v[:, :2], 1.0)
    for a, e in zip(portable, fused):
        torch.testing.assert_close(_finite(a), _finite(e), rtol=1e-10, atol=1e-11)


def test_nothing_allowed_gives_zeros_minus_inf_and_zero_gradients():
    q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out, lse = attention(q, k, v, Predicate(lambda i, j: j > i + 100), backend="sparse", return_lse=True)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    out.sum().backward()
    assert all(torch.all(t.grad == 0) for t in (q, k, v))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_low_precision_stays_close(dtype, tol):
    q, k, v = (torch.randn(1, 4, 300, 32, dtype=torch.float64) for _ in range(3))
    expected, _ = reference_kernel(q, k[:, :1], v[:, :1], Strided(32), 0.2)[:2]
    actual = attention(*(t.to(dtype) for t in (q, k[:, :1], v[:, :1])), Strided(32), scale=0.2, backend="sparse")
    assert actual.dtype == dtype
    assert float((actual.double() - expected).abs().max()) < tol


def test_gqa_reads_keys_as_views_without_repeating_them():
    plan = plan_sparse(SlidingWindow(64), 512, 512, torch.device("cpu"))
    k = torch.randn(2, 512, 8)  # (B * Hkv, N, D)
    interior = max((g for part in plan.parts for g in part), key=lambda g: len(g.q_pos))
    _, k_index = sparse_module._unit_indices(interior, plan)
    units = k_index.read(k)
    assert units.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()


@pytest.mark.parametrize("pattern", [SlidingWindow(128), Strided(64), Fixed(64, 4)])
def test_memory_follows_the_allowed_pairs_not_the_square(pattern):
    n = 4096
    q, k, v = (torch.randn(1, 2, n, 32, requires_grad=True) for _ in range(3))
    attention(q, k[:, :1], v[:, :1], pattern, backend="sparse")  # plan once, outside the measure

    def forward_backward():
        attention(q, k[:, :1], v[:, :1], pattern, backend="sparse").sum().backward()

    square = n * n * 4
    assert largest_tensor_bytes(forward_backward) < square / 16


def test_plans_compute_about_the_allowed_pairs():
    n = 8192
    for pattern, slack in [(SlidingWindow(256), 1.15), (Strided(128), 1.7), (Fixed(128, 8), 1.6)]:
        assert sparse_plan_pairs(pattern, n, n) < slack * pattern.count(n, n), pattern


def test_auto_sends_sparse_patterns_to_the_planner_and_dense_ones_to_sdpa():
    cpu = torch.device("cpu")
    for pattern in (Strided(128), Fixed(128, 8), SlidingWindow(256), Strided(64) | SlidingWindow(300)):
        assert choose_backend(pattern, 8192, 8192, cpu, need_lse=False) == "sparse", pattern
    assert choose_backend(Strided(4), 16, 16, cpu, need_lse=False) == "dense"
    per_head = PerHead([Strided(128), Fixed(128, 8)])
    assert choose_backend(per_head, 8192, 8192, cpu, need_lse=False, n_q_heads=2) == "sparse"
    layout = torch.eye(64, dtype=torch.bool)
    assert choose_backend(BlockSparse(layout, 128), 8192, 8192, cpu, need_lse=False) == "sparse"


@pytest.mark.parametrize("n_q, n_k", [(3, 3), (2, 1), (1, 4)])
def test_nothing_allowed_with_any_alignment(n_q, n_k):
    q = torch.randn(1, 1, n_q, 4, dtype=torch.float64)
    k = torch.randn(1, 1, n_k, 4, dtype=torch.float64)
    nothing = BlockSparse(torch.zeros(n_k, n_k, dtype=torch.bool), 1)
    out, lse = attention(q, k, k, nothing, backend="sparse", return_lse=True)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
