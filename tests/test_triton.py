"""The Triton backend against float64 reference attention: out, LSE, dq, dk, dv, every pattern family.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by
``tests/conftest.py`` before the kernels are first imported) on CPU tensors, through the public
``attention(backend="triton")``. Sizes are small and odd so every edge of the kernels' tiles (16 x 16
in the interpreter) is hit: partial first/last tiles, ``Nq != Nk`` both ways, rows with no key, GQA
groups, decode-sized calls (packed heads, split keys), and grids folded under a lowered limit.
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
from attnkit.kernels import triton_lists  # noqa: E402
from attnkit.kernels.triton_blocks import BlocksPart  # noqa: E402
from attnkit.kernels.triton_launch import MAX_SPLITS, _splits, kernel_parts, triton_available, triton_kernel  # noqa: E402
from attnkit.kernels.triton_lists import block_list, build_block_list  # noqa: E402
from attnkit.patterns import BlockLocal, Periodic, Piece, Summary  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {torch.float32: 3e-5, torch.float16: 6e-3, torch.bfloat16: 5e-2}


def block_layout(n_k: int, block: int, seed: int, heads: int = 0) -> torch.Tensor:
    n_blocks = -(-n_k // block)
    shape = (heads, n_blocks, n_blocks) if heads else (n_blocks, n_blocks)
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.45


def check(pattern, n_q: int, n_k: int, dtype=torch.float32, heads=(4, 2), dims=(24, 32), seed=0, strided=False,
          batch=1):
    """Forward and gradients (through out and LSE) against float64 reference attention."""
    gen = torch.Generator().manual_seed(seed)
    (hq, hkv), (d, dv) = heads, dims
    q = torch.randn(batch, hq, n_q, d, generator=gen).to(dtype)
    k = torch.randn(batch, hkv, n_k, d, generator=gen).to(dtype)
    v = torch.randn(batch, hkv, n_k, dv, generator=gen).to(dtype)
    grad_out = torch.randn(batch, hq, n_q, dv, generator=gen, dtype=torch.float64)
    grad_lse = torch.randn(batch, hq, n_q, generator=gen, dtype=torch.float64)

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
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (batch, hq, n_q)
    loss = (out.double() * grad_out.to(DEVICE)).sum() + (lse.double().masked_fill(~seen.to(DEVICE), 0) * grad_lse.to(DEVICE)).sum()
    grads = torch.autograd.grad(loss, inputs)

    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double().cpu(), ref_out.detach(), atol=tol, rtol=tol)
    assert torch.equal(torch.isfinite(lse).cpu(), seen)
    assert torch.equal(lse.cpu()[~seen], ref_lse.detach()[~seen])  # -inf where no key
    torch.testing.assert_close(lse.double().cpu()[seen], ref_lse.detach()[seen], atol=tol, rtol=tol)
    assert not out.cpu()[~seen].any()  # rows with no key give zeros
    for name, got, want in zip("qkv", grads, ref_grads):
        assert got.dtype == dtype  # stored in the input dtype by the kernels
        scale = max(1.0, float(want.abs().max()))
        torch.testing.assert_close(got.double().cpu(), want, atol=2 * tol * scale, rtol=2 * tol, msg=f"d{name}")


FAMILIES = {
    "window_causal": SlidingWindow(7),
    "window_symmetric": SlidingWindow(5, causal=False),
    "strided": Strided(5),
    "fixed": Fixed(8, 3),
    "periodic": Periodic(6),
    "block_local": BlockLocal(20),
    "summary": Summary(8, 3),
    "block_sparse": BlockSparse(block_layout(35, 8, seed=1), 8),
    "union": SlidingWindow(3) | Strided(6),
    "intersection": BlockLocal(12) & SlidingWindow(5),
    "predicate": Predicate(lambda i, j: (j <= i) & (j % 3 == 0)),
    "per_head": PerHead((SlidingWindow(4), Strided(3), Fixed(4, 1), BlockSparse(block_layout(35, 16, seed=2), 16))),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_families_match_reference(family):
    check(FAMILIES[family], 29, 35)


@pytest.mark.parametrize("pattern", [SlidingWindow(9), Fixed(6, 2), Strided(7), BlockSparse(block_layout(40, 8, seed=3), 8)],
                         ids=["window", "fixed", "strided", "block_sparse"])
def test_more_queries_than_keys_gives_empty_rows(pattern):
    check(pattern, 50, 40)  # the first 10 query rows sit at negative positions: no key


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pattern", [SlidingWindow(6), Strided(4), Fixed(6, 2)], ids=["window", "strided", "fixed"])
def test_half_precision(pattern, dtype):
    check(pattern, 29, 33, dtype=dtype)


def test_mqa_and_odd_head_dims():
    check(Strided(3), 21, 21, heads=(3, 1), dims=(40, 20))  # dims padded to 64/32 inside


def test_segments_longer_than_tiles_have_interior_tiles():
    # BlockLocal(40) and Fixed(40, 5) on 16 x 16 tiles: tiles wholly inside a segment run unmasked.
    check(Fixed(40, 5), 90, 100, heads=(2, 1))
    check(BlockLocal(37), 80, 80, heads=(2, 2))


def test_non_contiguous_inputs():
    check(SlidingWindow(6, causal=False), 19, 26, strided=True)


@pytest.mark.parametrize("n_q", [1, 3, 16])
@pytest.mark.parametrize("pattern", [SlidingWindow(60), Causal(), Strided(7), Fixed(16, 3)],
                         ids=["window", "causal", "strided", "fixed"])
def test_decode_sizes(pattern, n_q):
    check(pattern, n_q, 90, heads=(4, 2))


@pytest.mark.parametrize("heads", [(8, 1), (6, 3), (5, 5)], ids=["group8", "group2", "mha"])
def test_decode_packs_a_group_into_the_query_tile(heads):
    # group x queries: 8 x 3 = 24 rows span two 16-row tiles; 2 x 3 and 1 x 3 fit one.
    check(SlidingWindow(30), 3, 77, heads=heads, batch=2)


def test_decode_with_more_queries_than_keys():
    check(SlidingWindow(5), 12, 7)


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


def test_empty_batch():
    q = torch.randn(0, 2, 5, 16, device=DEVICE, requires_grad=True)
    out, lse = attention(q, q, q, SlidingWindow(3), backend="triton", return_lse=True)
    assert out.shape == (0, 2, 5, 16) and lse.shape == (0, 2, 5)


def test_lse_alone_gets_its_gradient():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=gen, device=DEVICE, requires_grad=True) for _ in range(3))
    _, lse = triton_kernel(q, k, v, Strided(4), 0.25)
    grads = torch.autograd.grad(lse.sum(), (q, k, v))
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    _, ref_lse, _ = reference_kernel(*exact, Strided(4), 0.25)
    wanted = torch.autograd.grad(ref_lse.sum(), exact, allow_unused=True)  # v does not reach the LSE
    for got, want, t in zip(grads, wanted, exact):
        want = torch.zeros_like(t) if want is None else want
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_grids_fold_under_a_lowered_limit(monkeypatch):
    # CUDA allows 65,535 programs on grid axes 1 and 2; with the limit at 3, (batch x heads) and the
    # residues of Strided(5) overflow it, so every kernel runs on a folded one-axis grid.
    from attnkit.kernels import triton_configs

    folded = []
    grid = triton_configs.grid

    def recording_grid(*args, **kwargs):
        shape, is_folded = grid(*args, **kwargs)
        folded.append(is_folded)
        return shape, is_folded

    monkeypatch.setattr(triton_configs, "GRID_LIMIT", 3)
    monkeypatch.setattr(triton_configs, "grid", recording_grid)
    for pattern, n_q in ((Strided(5), 29), (Fixed(8, 3), 29), (FAMILIES["block_sparse"], 29), (SlidingWindow(30), 3)):
        folded.clear()
        check(pattern, n_q, 35, heads=(4, 2), batch=2)
        assert folded and all(folded)


def test_parts_come_from_pattern_facts():
    strided = kernel_parts(Strided(8))
    assert [(p.lo, p.hi, p.step) for p in strided] == [(0, 8, 1), (2, float("inf"), 8)]
    assert [p.keys for p in kernel_parts(Fixed(8, 2))] == ["lattice", "summary"]
    assert [p.segment for p in kernel_parts(BlockLocal(6))] == [6]
    assert kernel_parts(BlockLocal(12) & SlidingWindow(5)) == (Piece(0, 4, segment=12),)  # the meet, one piece
    assert isinstance(kernel_parts(SlidingWindow(3) | Strided(4))[0], BlocksPart)
    assert isinstance(kernel_parts(Piece(0, 9, step=3, segment=6))[0], BlocksPart)  # segments need step 1


def test_pieces_the_band_kernels_do_not_take_run_on_block_lists():
    check(Piece(0, 9, step=3, segment=6), 29, 35)


def test_decode_split_counts_are_few_powers_of_two(monkeypatch):
    # The split count is a compile-time constant: a growing decode cache must not compile a new
    # kernel per length, so only powers of two up to MAX_SPLITS may come out.
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    counts = {_splits(tiles, programs, torch.device("cuda")) for tiles in range(1, 300) for programs in (1, 2, 16)}
    assert counts == {1 << n for n in range(MAX_SPLITS.bit_length())}


def dense_blocks(pattern, n_q: int, n_k: int, blk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(allowed, padding)``, each ``(nqb, nkb, blk, blk)`` bool: the pattern on every block pair
    (keys past ``n_k`` not allowed) and which of their query rows lie past ``n_q``."""
    rows = torch.arange(-(-n_q // blk) * blk)
    cols = torch.arange(-(-n_k // blk) * blk)
    ok = pattern.allows((rows + n_k - n_q).clamp(max=n_k - 1)[:, None], cols.clamp(max=n_k - 1)[None, :])
    ok = ok & (cols < n_k)[None, :] & (rows < n_q)[:, None]
    pad = (rows >= n_q)[:, None].expand_as(ok)
    return tuple(t.reshape(len(rows) // blk, blk, len(cols) // blk, blk).transpose(1, 2) for t in (ok, pad))


@pytest.mark.parametrize("pattern", [Predicate(lambda i, j: (j <= i) & ((i - j) % 5 != 1)),
                                     SlidingWindow(9) | Strided(7), BlockSparse(block_layout(50, 8, seed=5), 8),
                                     BlockSparse(block_layout(64, 16, seed=4), 16)],
                         ids=["predicate", "union", "block_sparse", "aligned_block_sparse"])
def test_block_lists_split_full_and_partial_blocks_exactly(pattern, monkeypatch):
    n_q, n_k, blk = 45, 50, 16
    lists = build_block_list(pattern, n_q, n_k, blk, torch.device("cpu"))
    ok, pad = dense_blocks(pattern, n_q, n_k, blk)
    nonempty = ok.flatten(2).any(2)
    full = nonempty & (ok | pad).flatten(2).all(2)
    for side, transposed in ((lists.by_query, False), (lists.by_key, True)):
        want_full, want_partial = (full.T, (nonempty & ~full).T) if transposed else (full, nonempty & ~full)
        for owner in range(want_full.shape[0]):
            got_full = side.full[owner, : side.full_count[owner]].tolist()
            got_partial = side.partial[owner, : side.partial_count[owner]].tolist()
            assert got_full == want_full[owner].nonzero().flatten().tolist()
            assert got_partial == want_partial[owner].nonzero().flatten().tolist()
            for other, mask_id in zip(got_partial, side.mask[owner].tolist()):
                pair = (other, owner) if transposed else (owner, other)
                assert torch.equal(lists.masks[mask_id].bool() & ~pad[pair], ok[pair])  # padding rows: any
    monkeypatch.setattr(triton_lists, "_EVAL_PAIRS", blk * blk)  # one block per evaluation chunk
    chunked = build_block_list(pattern, n_q, n_k, blk, torch.device("cpu"))
    for side in ("by_query", "by_key"):
        for name in ("full", "full_count", "partial", "partial_count"):
            assert torch.equal(getattr(getattr(lists, side), name), getattr(getattr(chunked, side), name))


def test_block_lists_are_cached_by_the_patterns_value():
    def lists(pattern):
        return block_list(pattern, 40, 40, 16, torch.device("cpu"))

    layout = block_layout(40, 8, seed=6)
    assert lists(SlidingWindow(5) | Strided(7)) is lists(SlidingWindow(5) | Strided(7))  # rebuilt each step
    assert lists(BlockSparse(layout.clone(), 8)) is lists(BlockSparse(layout.clone(), 8))
    assert lists(BlockSparse(layout, 8)) is not lists(BlockSparse(~layout, 8))
    assert lists(SlidingWindow(5) | Strided(7)) is not lists(SlidingWindow(5) | Strided(8))
    rule = lambda i, j: j <= i  # noqa: E731
    assert lists(Predicate(rule)) is lists(Predicate(rule))
    assert lists(Predicate(rule)) is not lists(Predicate(lambda i, j: j <= i))  # functions by identity


def test_configurations_over_the_devices_shared_memory_are_avoided(monkeypatch):
    # sm_86/sm_89 allow 99 KiB per block: block lists of 64 at head dim 128 do not fit there
    # (static_check measured 100-102 KiB on sm_90), the candidates over the limit are pruned.
    from attnkit.kernels import triton_configs as configs

    monkeypatch.setattr(configs, "interpreting", lambda: False)
    cuda = torch.device("cuda")
    for limit, block in ((configs.SM90_SHARED, 64), (101376, 32)):
        monkeypatch.setattr(configs, "shared_limit", lambda device, limit=limit: limit)
        assert configs.block_size(128, 128, 2, cuda) == block
        q = SimpleNamespace(element_size=lambda: 2, device=cuda)
        for kind in ("fwd", "dq", "dkdv"):
            kept = configs.pruner(kind)(configs.configs(kind), {"Q": q}, D=128, DV=128)
            tiles = [(c.kwargs["BM"], c.kwargs["BN"], c.num_warps, c.num_stages) for c in kept]
            assert tiles and set(tiles) <= set(configs.NARROW[kind])
            assert all(configs.shared_bytes(kind, t, 128, 128, 2) <= limit for t in tiles)
    assert configs.block_size(64, 64, 2, cuda) == 64  # compact rows fit 64 even in 99 KiB


def test_float32_rows_take_their_own_tiles(monkeypatch):
    # tf32x3's split operands need more registers than a half-precision dot of the same row width:
    # float32 at head dim 64 (256 bytes, a "narrow" row) spilled 88-508 bytes on NARROW's tiles.
    from attnkit.kernels import triton_configs as configs

    monkeypatch.setattr(configs, "interpreting", lambda: False)
    assert configs.candidates("fwd", 64, 64, 4) == configs.SINGLE["fwd"]
    assert configs.candidates("dkdv", 128, 128, 4) == configs.SINGLE_WIDE["dkdv"]
    assert configs.candidates("fwd", 128, 128, 2) == configs.NARROW["fwd"]
    assert configs.candidates("fwd", 256, 256, 2) == configs.WIDE["fwd"]
    for kind in ("fwd", "dq", "dkdv"):
        offered = {(c.kwargs["BM"], c.kwargs["BN"], c.num_warps, c.num_stages) for c in configs.configs(kind)}
        assert all(set(tiles[kind]) <= offered for tiles in configs.TILES.values())
