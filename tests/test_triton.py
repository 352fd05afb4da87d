"""The Triton backend against float64 reference attention: out, LSE, dq, dk, dv, every pattern family.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by
``tests/conftest.py`` before the kernels are first imported) on CPU tensors, through the public ``attention(backend="triton")``.
Sizes are small and odd so every edge of the kernels' blocks (16 x 16 in the interpreter) is hit:
partial first/last blocks, ``Nq != Nk`` both ways, rows with no key, GQA groups.
"""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("no CUDA device and TRITON_INTERPRET is off: the Triton kernels cannot run here",
                allow_module_level=True)
pytest.importorskip("triton")

from attnkit import BlockSparse, Causal, Fixed, PerHead, Predicate, SlidingWindow, Strided, attention  # noqa: E402
from attnkit.backends import make_problem, pick  # noqa: E402
from attnkit.kernels.reference import reference_kernel  # noqa: E402
from attnkit.kernels.triton_launch import (  # noqa: E402
    MAX_SPLITS,
    _part_splits,
    _splits,
    kernel_parts,
    triton_available,
)
from attnkit.kernels.triton_blocks import BlocksPart, block_list  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {torch.float32: 3e-5, torch.float16: 6e-3, torch.bfloat16: 5e-2}


def _layout(n_k: int, block: int, seed: int, heads: int = 0) -> torch.Tensor:
    n_blocks = -(-n_k // block)
    shape = (heads, n_blocks, n_blocks) if heads else (n_blocks, n_blocks)
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.45


def _check(pattern, n_q: int, n_k: int, dtype=torch.float32, heads=(4, 2), dims=(24, 32), seed=0, strided=False):
    """Forward and gradients (through out and LSE) against float64 reference attention."""
    gen = torch.Generator().manual_seed(seed)
    (hq, hkv), (d, dv) = heads, dims
    q = torch.randn(1, hq, n_q, d, generator=gen).to(dtype)
    k = torch.randn(1, hkv, n_k, d, generator=gen).to(dtype)
    v = torch.randn(1, hkv, n_k, dv, generator=gen).to(dtype)
    grad_out = torch.randn(1, hq, n_q, dv, generator=gen, dtype=torch.float64)
    grad_lse = torch.randn(1, hq, n_q, generator=gen, dtype=torch.float64)

    exact = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse, _ = reference_kernel(*exact, pattern, 0.37)
    seen = torch.isfinite(ref_lse)
    loss = (ref_out * grad_out).sum() + (ref_lse.masked_fill(~seen, 0) * grad_lse).sum()
    ref_grads = torch.autograd.grad(loss, exact)

    ours = [t.to(DEVICE).requires_grad_() for t in (q, k, v)]
    inputs = ours
    if strided:  # (B, N, H, D) storage seen as (B, H, N, D): no stride assumption but the last
        inputs = [t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in ours]
        assert not inputs[0].is_contiguous()
    out, lse = attention(*inputs, pattern, scale=0.37, backend="triton", return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (1, hq, n_q)
    loss = (out.double() * grad_out.to(DEVICE)).sum() + (lse.double().masked_fill(~seen.to(DEVICE), 0) * grad_lse.to(DEVICE)).sum()
    grads = torch.autograd.grad(loss, inputs)

    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double().cpu(), ref_out.detach(), atol=tol, rtol=tol)
    assert torch.equal(torch.isfinite(lse).cpu(), seen)
    assert torch.equal(lse.cpu()[~seen], ref_lse.detach()[~seen])  # -inf where no key
    torch.testing.assert_close(lse.double().cpu()[seen], ref_lse.detach()[seen], atol=tol, rtol=tol)
    assert not out.cpu()[~seen].any()  # rows with no key give zeros
    for name, got, want in zip("qkv", grads, ref_grads):
        scale = max(1.0, float(want.abs().max()))
        torch.testing.assert_close(got.double().cpu(), want, atol=2 * tol * scale, rtol=2 * tol, msg=f"d{name}")


FAMILIES = {
    "window_causal": SlidingWindow(7),
    "window_symmetric": SlidingWindow(5, causal=False),
    "strided": Strided(5),
    "fixed": Fixed(8, 3),
    "block_sparse": BlockSparse(_layout(35, 8, seed=1), 8),
    "union": SlidingWindow(3) | Strided(6),
    "predicate": Predicate(lambda i, j: (j <= i) & (j % 3 == 0)),
    "per_head": PerHead((SlidingWindow(4), Strided(3), Fixed(4, 1), BlockSparse(_layout(35, 16, seed=2), 16))),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_families_match_reference(family):
    _check(FAMILIES[family], 29, 35)


@pytest.mark.parametrize("pattern", [SlidingWindow(9), Fixed(6, 2), BlockSparse(_layout(40, 8, seed=3), 8)],
                         ids=["window", "fixed", "block_sparse"])
def test_more_queries_than_keys_gives_empty_rows(pattern):
    _check(pattern, 50, 40)  # the first 10 query rows sit at negative positions: no key


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pattern", [SlidingWindow(6), Strided(4)], ids=["window", "strided"])
def test_half_precision(pattern, dtype):
    _check(pattern, 29, 33, dtype=dtype)


def test_mqa_and_odd_head_dims():
    _check(Strided(3), 21, 21, heads=(3, 1), dims=(40, 20))  # dims padded to 64/32 inside


def test_non_contiguous_inputs():
    _check(SlidingWindow(6, causal=False), 19, 26, strided=True)


@pytest.mark.parametrize("pattern", [SlidingWindow(60), Causal()], ids=["window", "causal"])
def test_decoding_splits_keys_and_merges(pattern):
    q, k = torch.zeros(1, 4, 3, 16), torch.zeros(1, 2, 90, 16)
    assert max(_part_splits(part, q, k) for part in kernel_parts(pattern)) > 1
    _check(pattern, 3, 90)


def test_split_counts_are_few_powers_of_two(monkeypatch):
    # The split count is a compile-time constant: a growing decode cache must not compile a new
    # kernel per length, so only powers of two (capped) may come out.
    q = torch.zeros(1, 1, 1, 16)
    counts = {_part_splits(part, q, torch.zeros(1, 1, n, 16)) for n in range(1, 1200, 7) for part in kernel_parts(Causal())}
    assert counts == {1, 2, 4, 8, 16}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    big = {_splits(1, tiles, 1, torch.device("cuda")) for tiles in range(1, 3000)}
    assert max(big) == MAX_SPLITS and all(n & (n - 1) == 0 for n in big) and len(big) == 7


def test_parts_come_from_pattern_facts():
    strided = kernel_parts(Strided(8))
    assert [(p.lo, p.hi, p.step) for p in strided] == [(0, 8, 1), (2, float("inf"), 8)]
    assert [p.keys for p in kernel_parts(Fixed(8, 2))] == ["lattice", "summary"]
    assert isinstance(kernel_parts(SlidingWindow(3) | Strided(4))[0], BlocksPart)


def test_aligned_block_sparse_needs_no_element_masks():
    layout = _layout(64, 16, seed=4)
    lists = block_list(BlockSparse(layout, 16), 64, 64, 16, torch.device("cpu"))
    assert int(lists.kv_count.sum()) == int(layout.sum())
    assert bool((lists.kv_mask == -1).all())


def test_float64_runs_the_sparse_backend_exactly():
    q, k, v = (torch.randn(1, 2, 13, 8, dtype=torch.float64, device=DEVICE) for _ in range(3))
    out = attention(q, k, v, SlidingWindow(4), backend="triton")
    ref, _, _ = reference_kernel(q, k, v, SlidingWindow(4), 8 ** -0.5)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


def test_auto_keeps_cpu_and_causal_off_triton():
    def auto(t, pattern):
        return pick(make_problem(t, t, t, pattern, None, False)).name

    q = torch.randn(1, 2, 8, 16)
    assert auto(q, SlidingWindow(4)) != "triton"  # CPU tensors: the planner, as before
    if torch.cuda.is_available():
        g = q.cuda().half()
        assert auto(g, SlidingWindow(4)) == "triton" and auto(g, Causal()) != "triton"
        assert auto(g.double(), SlidingWindow(4)) != "triton"  # float64: the kernels do not take it


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in triton_available(torch.device("cpu"))
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="backend 'triton' cannot run"):
        attention(q, q, q, SlidingWindow(2), backend="triton")


def test_package_import_does_not_import_triton():
    code = "import sys, attnkit, attnkit.functional; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_block_lists_do_not_depend_on_the_evaluation_chunk(monkeypatch):
    import attnkit.kernels.triton_blocks as blocks

    pattern = Predicate(lambda i, j: (j <= i) & ((i - j) % 5 != 1))
    whole = block_list(pattern, 45, 50, 16, torch.device("cpu"))
    block_list.cache_clear()
    monkeypatch.setattr(blocks, "_EVAL_CHUNK", 16 * 16)  # one block per chunk
    chunked = block_list(pattern, 45, 50, 16, torch.device("cpu"))
    block_list.cache_clear()
    for name in ("kv_index", "kv_count", "q_index", "q_count"):
        assert torch.equal(getattr(whole, name), getattr(chunked, name))
    for a, b in ((whole.kv_mask, chunked.kv_mask), (whole.q_mask, chunked.q_mask)):
        assert torch.equal(a == -1, b == -1)
        assert torch.equal(whole.masks[a.clamp(min=0)], chunked.masks[b.clamp(min=0)])


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90():
    """Triton's real compiler (not the interpreter) on every tile configuration: minutes on a CPU."""
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu", "compile_check.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_empty_batch():
    q = torch.randn(0, 2, 5, 16, device=DEVICE, requires_grad=True)
    out, lse = attention(q, q, q, SlidingWindow(3), backend="triton", return_lse=True)
    assert out.shape == (0, 2, 5, 16) and lse.shape == (0, 2, 5)
