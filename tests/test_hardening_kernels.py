"""Kernel hardening: strided views, merges of huge tied scores, masks that do not fit, and the
rule that a NaN or inf reaches only the rows that may see it."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attnkit import (
    Causal,
    Fixed,
    Full,
    PerHead,
    Predicate,
    SlidingWindow,
    Strided,
    attention,
    reference_attention,
)
from attnkit.backends import choose_backend
from attnkit.kernels import dense as dense_module
from attnkit.kernels.common import all_finite
from attnkit.patterns import BlockLocal, Periodic, Summary
from strategies import arrange

ALL_BACKENDS = ["reference", "dense", "blockwise", "sparse", "auto"]


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    finite = torch.isfinite(expected)
    return float((actual[finite] - expected[finite]).norm() / expected[finite].norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------
# 1. Views whose head dimension is not unit-stride (the fused LSE op read them as if it were).


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("pattern", [Causal(), SlidingWindow(9), Strided(8)])
@pytest.mark.parametrize("layouts", [
    ("contiguous", "transposed", "contiguous"), ("contiguous", "contiguous", "transposed"),
    ("transposed", "sliced", "sliced"), ("seq_major", "rows", "expanded"),
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lse_path_reads_strided_views_exactly(backend, pattern, layouts, dtype):
    gen = torch.Generator().manual_seed(3)
    base = [torch.randn(1, 4, n, 32, generator=gen, dtype=dtype) for n in (40, 67, 67)]
    base[1:] = [t[:, :2] for t in base[1:]]
    leaves = [t.clone().requires_grad_() for t in base]
    out, lse = attention(*(arrange(t, lay) for t, lay in zip(leaves, layouts)), pattern, backend=backend,
                         return_lse=True)
    # The same values, contiguous, in float64, through the reference.
    ref_leaves = [t.double().requires_grad_() for t in base]
    ref_inputs = [arrange(t, lay).contiguous() for t, lay in zip(ref_leaves, layouts)]
    ref_out, ref_lse = attention(*ref_inputs, pattern, backend="reference", return_lse=True)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert _rel(out, ref_out) < tol and _rel(lse, ref_lse) < tol
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * weight).sum() + lse.double().sum(), leaves)
    ref_grads = torch.autograd.grad((ref_out * weight).sum() + ref_lse.sum(), ref_leaves)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert _rel(g, r) < tol * 10, name


def test_lse_path_with_the_issue_example():
    q = torch.randn(1, 2, 67, 32)
    k = torch.randn(1, 2, 32, 67).transpose(2, 3)
    v = torch.randn(1, 2, 67, 32)
    for backend in ("dense", "auto"):
        out, lse = attention(q, k, v, backend=backend, return_lse=True)
        ref_out, ref_lse = attention(q.double(), k.double().contiguous(), v.double(), return_lse=True,
                                     backend="reference")
        assert _rel(out, ref_out) < 1e-5 and _rel(lse, ref_lse) < 1e-5, backend


# ---------------------------------------------------------------------------------------------
# 2. Merging parts whose scores are huge and tied.


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("pattern", [Strided(8), Fixed(8, 2), Strided(4) | SlidingWindow(12)])
@pytest.mark.parametrize("c", [10.0, 100.0, 1e4])
def test_tied_large_scores_merge_exactly(backend, pattern, c):
    q = k = torch.full((1, 2, 41, 16), c)
    v = torch.randn(1, 2, 41, 16, generator=torch.Generator().manual_seed(0))
    out, lse = attention(q, k, v, pattern, backend=backend, return_lse=True)
    ref_out, ref_lse = attention(q.double(), k.double(), v.double(), pattern, backend="reference", return_lse=True)
    assert _rel(out, ref_out) < 1e-6
    assert _rel(lse, ref_lse) < 1e-6


def test_tied_large_scores_on_the_portable_path(monkeypatch):
    from attnkit.kernels import sparse as sparse_module

    monkeypatch.setattr(sparse_module, "_FUSED", None)
    q = k = torch.full((1, 2, 41, 16), 1e4)
    v = torch.randn(1, 2, 41, 16, generator=torch.Generator().manual_seed(0))
    out = attention(q, k, v, Strided(8), backend="sparse")
    ref_out, _ = reference_attention(q.double(), k.double(), v.double(), Strided(8))
    assert _rel(out, ref_out) < 1e-6


# ---------------------------------------------------------------------------------------------
# 6. Masks without n x n int64 temporaries; dense refuses masks that do not fit; auto avoids them.


class _LargestIntegerTensor(TorchDispatchMode):
    """Records the largest int64 tensor any operation returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.int64:
                self.largest = max(self.largest, t.numel())
        return result


@pytest.mark.parametrize("pattern", [
    SlidingWindow(256), SlidingWindow(7, causal=False), Causal(), Full(), Strided(16), Periodic(16),
    Fixed(16, 2), BlockLocal(16), Summary(16, 3), Strided(8) | SlidingWindow(40),
])
def test_masks_build_no_square_integer_temporaries(pattern):
    n = 1024
    expected = pattern.allows(torch.arange(n)[:, None], torch.arange(n)[None, :])
    with _LargestIntegerTensor() as spy:
        mask = pattern.mask(n, n)
    assert spy.largest < n * n // 8
    assert mask.dtype == torch.bool and torch.equal(mask, expected.expand(n, n))


def test_predicate_masks_are_evaluated_a_block_of_rows_at_a_time(monkeypatch):
    from attnkit.patterns import base as patterns

    monkeypatch.setattr(patterns, "_MASK_ELEMENTS", 1000)
    sizes = []

    def every_third(i, j):
        sizes.append(torch.broadcast_shapes(i.shape, j.shape).numel())
        return (i - j) % 3 == 0

    mask = Predicate(every_third).mask(100, 100)
    assert max(sizes) <= 1000 and len(sizes) == 10
    i, j = torch.arange(100)[:, None], torch.arange(100)[None, :]
    assert torch.equal(mask, (i - j) % 3 == 0)
    per_head = PerHead([Causal(), SlidingWindow(3)]).mask(50, 60)
    assert torch.equal(per_head[1], SlidingWindow(3).mask(50, 60))


@pytest.fixture
def free_bytes(monkeypatch):
    """Pretend the machine has this many bytes free, and check masks from the first byte."""
    monkeypatch.setattr(dense_module, "MASK_CHECKED_ABOVE", 0)

    def set_free(free: int) -> None:
        monkeypatch.setattr(dense_module, "free_memory", lambda device: free)

    return set_free


def test_dense_refuses_a_mask_beyond_a_quarter_of_free_memory(free_bytes):
    q = k = v = torch.randn(1, 1, 64, 8)
    # The oracle first: the reference backend's 64 x 64 weights are held to the same budget.
    expected = attention(q, k, v, Causal(), backend="reference")
    free_bytes(4000)  # a 1000-byte budget; the mask takes 64 x 64 x (1 + 4)
    with pytest.raises(ValueError, match=r"SlidingWindow\(size=8.*Nq=64, Nk=64.*backend='sparse'"):
        attention(q, k, v, SlidingWindow(8), backend="dense")
    # No mask needed: full and causal attention run whatever the budget.
    torch.testing.assert_close(attention(q, k, v, Causal(), backend="dense"), expected)
    free_bytes(4 * 64 * 64 * 5)  # exactly a quarter: fits
    attention(q, k, v, SlidingWindow(8), backend="dense")


@pytest.mark.parametrize("dtype, head_dim", [(torch.bfloat16, 64), (torch.float32, 72)])
def test_auto_never_picks_dense_for_a_window_it_cannot_hold(free_bytes, dtype, head_dim):
    # A window covering most keys goes to masked SDPA while its mask fits (4096^2 x 3 or 5
    # bytes, 48-80 MiB); with 160 MiB free (a 40 MiB budget) it must not. The native band
    # kernel cannot take bf16 or a head_dim that is not a multiple of 16.
    cpu = torch.device("cpu")
    window = SlidingWindow(3000)
    choose = lambda pattern: choose_backend(pattern, 4096, 4096, cpu, need_lse=False, head_dim=head_dim,
                                            value_dim=head_dim, dtype=dtype)
    free_bytes(2**40)
    assert choose(window) == "dense"
    free_bytes(160 * 2**20)
    assert choose(window) == "sparse"
    assert choose(Predicate(lambda i, j: j <= i + 5)) == "blockwise"
    assert choose(Causal()) == "dense"  # no mask


def test_free_memory_is_known_on_this_cpu():
    free = dense_module.free_memory(torch.device("cpu"))
    assert free is not None and free > 0


# ---------------------------------------------------------------------------------------------
# 7. A NaN or inf reaches only the rows that may see it.


def _poisoned(kind: str, position: int, dim: int = 16, value=float("nan")):
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 4, 48, dim, generator=gen) for _ in range(3))
    k, v = k[:, :2].clone(), v[:, :2].clone()
    bad_k, bad_v = k.clone(), v.clone()
    (bad_k if kind == "k" else bad_v)[1, 1, position, 3] = value
    return q, (k, v), (bad_k, bad_v)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("pattern, position", [
    (Causal(), 20), (SlidingWindow(4), 20), (SlidingWindow(5, causal=False), 30), (Strided(8), 16),
    (Fixed(8, 2), 15), (Predicate(lambda i, j: (j <= i) & (j % 3 == 0)), 21),
])
@pytest.mark.parametrize("kind, value", [("k", float("nan")), ("v", float("nan")), ("v", float("inf"))])
def test_non_finite_entries_reach_only_the_rows_that_may_see_them(backend, pattern, position, kind, value):
    _check_visibility(backend, pattern, position, kind, value, dim=16)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("pattern", [SlidingWindow(4), Strided(8)])
@pytest.mark.parametrize("kind, value", [("k", float("inf")), ("v", float("nan"))])
def test_non_finite_entries_with_a_head_dim_the_native_kernel_skips(backend, pattern, kind, value):
    _check_visibility(backend, pattern, 20, kind, value, dim=12)


def _check_visibility(backend, pattern, position, kind, value, dim):
    q, clean, bad = _poisoned(kind, position, dim, value)
    out, lse = attention(q, *bad, pattern, backend=backend, return_lse=True)
    expected_out, expected_lse = attention(q, *clean, pattern, backend=backend, return_lse=True)
    sees = pattern.mask(48, 48)[:, position]  # rows that may see the position
    blind = torch.ones(2, 4, 48, dtype=torch.bool)
    blind[1, 2:] = ~sees  # only query heads 2-3 of batch 1 use KV head 1 of batch 1
    torch.testing.assert_close(out[blind], expected_out[blind])
    torch.testing.assert_close(lse[blind], expected_lse[blind])
    if value != value:  # NaN is seen: those rows are NaN
        assert torch.isnan(out[~blind]).any(-1).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gradients_of_rows_that_cannot_see_a_nan_stay_finite(backend):
    q, (k, v), (bad_k, bad_v) = _poisoned("v", 20)
    bad_k[0, 0, 30, 0] = float("nan")
    leaves = [t.clone().requires_grad_() for t in (q, bad_k, bad_v)]
    out = attention(*leaves, Causal(), backend=backend)
    out[:, :, :20].sum().backward()  # rows 0-19 see neither NaN
    for leaf in leaves:
        assert torch.isfinite(leaf.grad).all()
    clean_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    attention(*clean_leaves, Causal(), backend=backend)[:, :, :20].sum().backward()
    for leaf, clean in zip(leaves, clean_leaves):
        torch.testing.assert_close(leaf.grad, clean.grad)


def test_sliding_window_dense_is_not_all_nan():
    q, _, bad = _poisoned("k", 20)
    out = attention(q, *bad, SlidingWindow(4), backend="dense")
    assert int(torch.isnan(out).any(-1).sum()) == 2 * 4  # 2 query heads x the 4 rows that see it


def test_reference_weights_follow_the_rule():
    q, (k, v), bad = _poisoned("v", 20)
    _, weights = reference_attention(q, *bad, Causal())
    _, clean_weights = reference_attention(q, k, v, Causal())
    torch.testing.assert_close(weights[:, :, :20], clean_weights[:, :, :20])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_the_finiteness_check_finds_every_nan_and_inf(dtype):
    out = torch.randn(2, 3, 50, 8).to(dtype)
    assert all_finite(out) and all_finite(out.transpose(2, 3)) and all_finite(out[..., ::2])
    largest = torch.full((100,), torch.finfo(dtype).max, dtype=dtype)
    assert all_finite(largest)  # a sum that overflows is not a NaN
    for value in (float("nan"), float("inf"), float("-inf")):
        bad = out.clone()
        bad[1, 2, 30, 5] = value
        assert not all_finite(bad) and not all_finite(bad.transpose(2, 3))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_rows_that_see_every_key_need_no_check_and_see_the_nan(backend):
    # Full attention, and one causal decoding query: every key is visible, so a NaN reaches all.
    q, _, (k, v) = _poisoned("v", 20)
    assert torch.isnan(attention(q, k, v, Full(), backend=backend)[1, 2:]).any(-1).all()
    assert torch.isnan(attention(q[:, :, -1:], k, v, Causal(), backend=backend)[1, 2:]).any(-1).all()


# ---------------------------------------------------------------------------------------------
# Review fixes: the portable path's key shift, keyless rows' LSE gradients, -inf scores in the
# backward pass, meta tensors, free CUDA memory and the merge threshold.


def _outlier_first_key(n: int, value_dim: int, magnitude: float):
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, n, 16, generator=gen) for _ in range(2))
    v = torch.randn(1, 2, n, value_dim, generator=gen)
    k[:, :, 0] *= magnitude  # an attention-sink-like key
    return q, k, v


@pytest.mark.parametrize("backend", ["sparse", "auto"])
@pytest.mark.parametrize("pattern, n, value_dim, magnitude", [
    (SlidingWindow(8), 64, 8, 1e4),  # the portable path directly (Dv != D)
    (Strided(8), 256, 16, 1e3),  # the fused path, rerun on the portable path (|lse| > 128)
])
def test_an_outlier_first_key_spoils_no_row_that_cannot_see_it(backend, pattern, n, value_dim, magnitude):
    q, k, v = _outlier_first_key(n, value_dim, magnitude)
    out, lse = attention(q, k, v, pattern, backend=backend, return_lse=True)
    ref_out, ref_lse = attention(q.double(), k.double(), v.double(), pattern, backend="reference", return_lse=True)
    blind = ~pattern.mask(n, n)[:, 0]
    assert _rel(out[:, :, blind], ref_out[:, :, blind]) < 1e-6
    assert _rel(lse[:, :, blind], ref_lse[:, :, blind]) < 1e-6


def test_a_nan_first_key_reaches_only_the_rows_that_see_it_inside_the_sparse_kernel():
    from attnkit.kernels.sparse import sparse_kernel

    q, k, v = _outlier_first_key(64, 8, 1.0)
    bad_k = k.clone()
    bad_k[0, 1, 0, 2] = float("nan")
    pattern = SlidingWindow(8)
    out, lse = sparse_kernel(q, bad_k, v, pattern, 0.25)  # no visibility repair: the kernel's own
    expected_out, expected_lse = sparse_kernel(q, k, v, pattern, 0.25)
    blind = ~pattern.mask(64, 64)[:, 0]
    torch.testing.assert_close(out[:, :, blind], expected_out[:, :, blind])
    torch.testing.assert_close(lse[:, :, blind], expected_lse[:, :, blind])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_rows_that_see_no_key_pass_no_lse_gradient(backend):
    gen = torch.Generator().manual_seed(1)
    base = [torch.randn(1, 2, n, d, generator=gen, dtype=torch.float64) for n, d in ((12, 8), (5, 8), (5, 6))]
    leaves = [t.clone().requires_grad_() for t in base]
    _, lse = attention(*leaves, Causal(), backend=backend, return_lse=True)
    ref_leaves = [t.clone().requires_grad_() for t in base]
    _, ref_lse = attention(*ref_leaves, Causal(), backend="reference", return_lse=True)
    assert torch.isinf(lse[:, :, :7]).all()  # rows 0-6 sit before the first key
    grads = torch.autograd.grad(lse, leaves, torch.ones_like(lse), allow_unused=True)
    ref_grads = torch.autograd.grad(ref_lse, ref_leaves, torch.ones_like(ref_lse), allow_unused=True)
    assert (grads[0][:, :, :7] == 0).all()
    for g, r in zip(grads[:2], ref_grads[:2]):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("pattern", [Causal(), Strided(4)])
def test_a_key_whose_scores_are_minus_inf_spoils_no_gradient_of_rows_that_cannot_see_it(backend, pattern):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 8, 8, generator=gen)
    q[..., 0] = q[..., 0].abs()
    k, v = (torch.randn(1, 1, 8, 8, generator=gen) for _ in range(2))
    bad_k = k.clone()
    bad_k[0, 0, 5, 0] = float("-inf")  # every score with key 5 is -inf: out stays finite
    leaves = [t.clone().requires_grad_() for t in (q, bad_k, v)]
    attention(*leaves, pattern, backend=backend).sum().backward()
    blind = ~pattern.mask(8, 8)[:, 5]
    clean = [t.clone().requires_grad_() for t in (q, k, v)]
    attention(*clean, pattern, backend=backend)[:, :, blind].sum().backward()
    for leaf, expected in zip(leaves, clean):
        assert torch.isfinite(leaf.grad).all()
        torch.testing.assert_close(leaf.grad, expected.grad)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_meta_tensors_give_shapes(backend):
    q = torch.empty(1, 4, 16, 8, device="meta")
    k, v = torch.empty(1, 2, 16, 8, device="meta"), torch.empty(1, 2, 16, 6, device="meta")
    out, lse = attention(q, k, v, SlidingWindow(4), backend=backend, return_lse=True)
    assert out.is_meta and out.shape == (1, 4, 16, 6) and lse.shape == (1, 4, 16)


def test_fake_tensors_pass_the_visibility_check():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(1, 2, 16, 8)
        out, weights = reference_attention(q, q, q, Strided(4))
    assert out.shape == (1, 2, 16, 8) and weights.shape == (1, 2, 16, 16)


def test_cuda_free_memory_counts_the_allocators_unused_blocks(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1000, 10_000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 700)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 200)
    assert dense_module.free_memory(torch.device("cuda")) == 1500


def test_ordinary_scores_keep_the_fused_merge(monkeypatch):
    from attnkit.kernels import sparse as sparse_module

    reruns = []
    portable = sparse_module._portable
    monkeypatch.setattr(sparse_module, "_portable", lambda *args: reruns.append(1) or portable(*args))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 96, 16, generator=gen) * s for s in (4, 4, 1))
    out, lse = attention(q, k, v, Strided(8), backend="sparse", return_lse=True)
    assert 32 < float(lse.abs().max()) < 128 and not reruns
    ref_out, ref_lse = attention(q.double(), k.double(), v.double(), Strided(8), backend="reference", return_lse=True)
    assert _rel(out, ref_out) < 1e-5 and _rel(lse, ref_lse) < 1e-6
    tied = torch.full((1, 2, 41, 16), 10.0)  # lse about 400: merged by row maxima
    out = attention(tied, tied, v[:, :, :41], Strided(8), backend="sparse")
    assert len(reruns) == 1
    assert _rel(out, reference_attention(tied.double(), tied.double(), v[:, :, :41].double(), Strided(8))[0]) < 1e-6
