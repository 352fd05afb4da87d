"""The blockwise kernel with many tiles, its tile plan, its memory bound, and merge_lse."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

from attnkit import Causal, Full, Predicate, SlidingWindow, attention, merge_lse
from attnkit.bench.runner import largest_tensor_bytes
from attnkit.kernels.blockwise import blockwise_kernel, plan_tiles, tile_pairs
from attnkit.kernels.reference import reference_kernel
from strategies import problems


@given(problem=problems(max_len=120), block_q=st.integers(1, 40), block_k=st.integers(1, 40))
def test_many_small_tiles_equal_the_reference(problem, block_q, block_k):
    # Inputs in the problem's memory layouts (transposed, sliced, stride-0 ...); the reference
    # gets contiguous copies.
    leaves = [t.clone().requires_grad_() for t in (problem.q, problem.k, problem.v)]
    scale = problem.q.shape[-1] ** -0.5
    out, lse = blockwise_kernel(
        *problem.arranged(*leaves), problem.pattern, scale, block_q=block_q, block_k=block_k
    )
    ref_leaves = [t.clone().requires_grad_() for t in (problem.q, problem.k, problem.v)]
    ref_inputs = [t.contiguous() for t in problem.arranged(*ref_leaves)]
    ref_out, ref_lse, _ = reference_kernel(*ref_inputs, problem.pattern, scale)
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-10)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    torch.testing.assert_close(lse[torch.isfinite(lse)], ref_lse[torch.isfinite(ref_lse)])
    weight = torch.randn_like(out)
    lse_weight = torch.where(torch.isinf(lse), 0.0, torch.randn_like(lse))
    grads = torch.autograd.grad((out * weight).sum() + (lse.nan_to_num(neginf=0) * lse_weight).sum(), leaves)
    ref_grads = torch.autograd.grad(
        (ref_out * weight).sum() + (ref_lse.nan_to_num(neginf=0) * lse_weight).sum(), ref_leaves
    )
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")


@given(problem=problems(max_len=90), block=st.integers(1, 24), seed=st.integers(0, 1000))
def test_explicit_positions_give_the_rows_of_the_full_problem(problem, block, seed):
    # A shuffled subset of the full problem's queries and keys, with their true positions, must
    # see the pattern exactly as the full problem does (ring attention relies on this).
    n_q, n_k = problem.q.shape[2], problem.k.shape[2]
    gen = torch.Generator().manual_seed(seed)
    q_pos = torch.randperm(n_q, generator=gen) + (n_k - n_q)
    k_pos = torch.randperm(n_k, generator=gen)
    rows, cols = q_pos - (n_k - n_q), k_pos
    scale = problem.q.shape[-1] ** -0.5
    leaves = [problem.q[:, :, rows].clone().requires_grad_(), problem.k[:, :, cols].clone().requires_grad_(),
              problem.v[:, :, cols].clone().requires_grad_()]
    out, lse = blockwise_kernel(*leaves, problem.pattern, scale, block_q=block, block_k=block,
                                positions=(q_pos, k_pos))
    ref_leaves = [t.clone().requires_grad_() for t in (problem.q, problem.k, problem.v)]
    ref_out, ref_lse, _ = reference_kernel(*ref_leaves, problem.pattern, scale)
    torch.testing.assert_close(out, ref_out[:, :, rows], rtol=1e-9, atol=1e-10)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse[:, :, rows]))
    weight = torch.randn_like(out)
    (d_q, d_k, d_v) = torch.autograd.grad((out * weight).sum(), leaves)
    full_weight = torch.zeros_like(ref_out)
    full_weight[:, :, rows] = weight
    ref_dq, ref_dk, ref_dv = torch.autograd.grad((ref_out * full_weight).sum(), ref_leaves)
    torch.testing.assert_close(d_q, ref_dq[:, :, rows], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(d_k, ref_dk[:, :, cols], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(d_v, ref_dv[:, :, cols], rtol=1e-9, atol=1e-10)


@given(problem=problems(max_len=120), block_q=st.integers(1, 40), block_k=st.integers(1, 40))
def test_many_small_tiles_in_float32_stay_within_1e5(problem, block_q, block_k):
    scale = problem.q.shape[-1] ** -0.5
    q, k, v = (t.float() for t in (problem.q, problem.k, problem.v))
    out, lse = blockwise_kernel(q, k, v, problem.pattern, scale, block_q=block_q, block_k=block_k)
    ref_out, ref_lse, _ = reference_kernel(*(t.double() for t in (q, k, v)), problem.pattern, scale)
    assert float((out.double() - ref_out).norm() / ref_out.norm().clamp_min(1e-30)) <= 1e-5
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], rtol=1e-5, atol=1e-5)


@given(n_q=st.integers(1, 100), n_k=st.integers(1, 100), block_q=st.integers(1, 32),
       block_k=st.integers(1, 32), window=st.integers(1, 30))
def test_plan_visits_exactly_the_tiles_with_allowed_pairs(n_q, n_k, block_q, block_k, window):
    for pattern in (Causal(), SlidingWindow(window), Predicate(lambda i, j: (i - j) % 7 == 0)):
        mask = pattern.mask(n_q, n_k)
        visited = torch.zeros(n_q, n_k, dtype=torch.bool)
        for block in plan_tiles(pattern, n_q, n_k, block_q, block_k):
            for k_start, k_stop, masked in block.tiles:
                tile = mask[block.q_start : block.q_stop, k_start:k_stop]
                assert tile.any(), "a planned tile must hold an allowed pair"
                assert masked == (not bool(tile.all())), "partial tiles, and only those, are masked"
                visited[block.q_start : block.q_stop, k_start:k_stop] = True
        assert not (mask & ~visited).any(), "every allowed pair is computed"


def test_causal_plan_does_about_half_of_the_square_and_windows_follow_the_band():
    n = 4096
    causal = tile_pairs(plan_tiles(Causal(), n, n))
    assert causal < 0.6 * n * n
    window = tile_pairs(plan_tiles(SlidingWindow(128), n, n, 128, 128))
    assert window <= 3 * 128 * n  # a 128-wide band touches at most 2-3 tiles per query block


def test_blockwise_never_allocates_a_square_tensor_forward_or_backward():
    n, heads = 4096, 2
    q, k, v = (torch.randn(1, heads, n, 64, requires_grad=True) for _ in range(3))

    def run(backend):
        out = attention(q, k, v, Causal(), backend=backend)
        out.sum().backward()

    square_bytes = n * n  # even a boolean N x N mask would be this large
    assert largest_tensor_bytes(lambda: run("blockwise")) < square_bytes / 4
    assert largest_tensor_bytes(lambda: run("reference")) >= square_bytes  # the probe can see it


@pytest.mark.parametrize("backend", ["dense", "blockwise", "reference"])
def test_merge_of_disjoint_key_sets_equals_attention_over_their_union(backend):
    q = torch.randn(2, 4, 50, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, 70, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    split = 31
    early = Causal() & Predicate(lambda i, j: j < split)
    late = Causal() & Predicate(lambda i, j: j >= split)
    parts = [attention(q, k, v, p, backend=backend, return_lse=True) for p in (early, late)]
    out, lse = merge_lse([p[0] for p in parts], [p[1] for p in parts])
    full_out, full_lse = attention(q, k, v, Causal(), backend="reference", return_lse=True)
    torch.testing.assert_close(out, full_out)
    torch.testing.assert_close(lse, full_lse)
    grads = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v))
    full_grads = torch.autograd.grad(full_out.sum() + full_lse.sum(), (q, k, v))
    for g, f in zip(grads, full_grads):
        torch.testing.assert_close(g, f)


def test_merge_of_rows_that_saw_nothing_gives_zeros_and_finite_gradients():
    outs = [torch.zeros(1, 1, 3, 2, requires_grad=True) for _ in range(2)]
    lses = [torch.full((1, 1, 3), float("-inf"), requires_grad=True) for _ in range(2)]
    out, lse = merge_lse(outs, lses)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in outs + lses)


def test_merge_lse_rejects_mismatched_lists():
    with pytest.raises(ValueError, match="outs and lses"):
        merge_lse([torch.zeros(1, 1, 1, 1)], [])


def test_full_pattern_plan_has_no_masks():
    blocks = plan_tiles(Full(), 300, 700, 128, 256)
    assert all(not masked for b in blocks for _, _, masked in b.tiles)
    assert tile_pairs(blocks) == 300 * 700


def test_explicit_positions_must_be_integer_vectors_of_the_right_length():
    q = k = v = torch.randn(1, 1, 4, 2)
    with pytest.raises(TypeError, match="positions must be integer tensors"):
        blockwise_kernel(q, k, v, Causal(), 1.0, positions=(torch.arange(4.0), torch.arange(4)))
    with pytest.raises(ValueError, match="vectors of 4 query and 4 key positions"):
        blockwise_kernel(q, k, v, Causal(), 1.0, positions=(torch.arange(3), torch.arange(4)))
