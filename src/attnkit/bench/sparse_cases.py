"""Sparse workloads for ``attnkit bench`` and the peers they are measured against.

Case sets ``window`` (SlidingWindow(256)), ``strided`` (Strided(128)), ``fixed`` (Fixed(128, 8)) and
``blocksparse`` (a BigBird-like layout: three local blocks and the first block as global, blocks of
128), B=1, H=8, D=64, float32. Contenders, all on the same inputs:

- ``torch sdpa``: the baseline, SDPA with the pattern as a boolean mask (built once per shape);
- ``attnkit auto``, ``attnkit sparse``, ``attnkit blockwise``;
- ``flex (compiled)``: ``torch.compile(flex_attention)`` with a block mask of 128 x 128 blocks
  created once per shape from the pattern's predicate (forward only: FlexAttention has no CPU
  backward);
- ``local-attention`` (windows only): lucidrains' ``LocalAttention`` configured to compute exactly
  ``SlidingWindow(w)``: it masks ``i - j > window_size * look_backward`` when
  ``exact_windowsize=True``, so ``window_size = w - 1``, ``look_backward = 1``, ``causal=True``,
  ``autopad=True`` (buckets of ``w - 1`` queries, each seeing its own and the previous bucket), no
  rotary embedding, default scale ``1/sqrt(D)``.

A peer that is not installed is skipped with a note in the table.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from ..patterns import BlockSparse, Fixed, Pattern, SlidingWindow, Strided
from .cases import AttentionFn, Contender, Workload, _attnkit, _sdpa_direct

FLEX_BLOCK = 128
QUICK_SPARSE_SEQS = (512,)
"""``--quick`` runs each sparse case at one length: every workload compiles FlexAttention anew."""


def window_case(seqs: tuple[int, ...]) -> list[Workload]:
    """SlidingWindow(256), the seed's "last few tokens" at long lengths."""
    return [Workload("window", SlidingWindow(256), seq) for seq in seqs]


def strided_case(seqs: tuple[int, ...]) -> list[Workload]:
    """The Sparse Transformer's strided pattern with stride 128."""
    return [Workload("strided", Strided(128), seq) for seq in seqs]


def fixed_case(seqs: tuple[int, ...]) -> list[Workload]:
    """The Sparse Transformer's fixed pattern, stride 128 and 8 summary positions per block."""
    return [Workload("fixed", Fixed(128, 8), seq) for seq in seqs]


def bigbird_layout(n_blocks: int, local: int = 3) -> torch.Tensor:
    """Causal block layout ``[n_blocks, n_blocks]``: ``local`` diagonal blocks plus block 0."""
    rows = torch.arange(n_blocks)[:, None]
    cols = torch.arange(n_blocks)[None, :]
    return ((rows - cols >= 0) & (rows - cols < local)) | ((cols == 0) & (rows >= 0))


def blocksparse_case(seqs: tuple[int, ...]) -> list[Workload]:
    """BlockSparse with :func:`bigbird_layout` and blocks of 128."""
    return [Workload("blocksparse", BlockSparse(bigbird_layout(-(-seq // 128)), 128), seq) for seq in seqs]


SPARSE_CASE_SETS: dict[str, Callable[[tuple[int, ...]], list[Workload]]] = {
    "window": window_case,
    "strided": strided_case,
    "fixed": fixed_case,
    "blocksparse": blocksparse_case,
}


def _mask_mod(pattern: Pattern, offset: int):
    """FlexAttention's ``mask_mod`` for ``pattern`` (bottom-right aligned by ``offset``)."""
    if isinstance(pattern, BlockSparse):
        layout, size = pattern.layout, pattern.block_size
        return lambda b, h, q_idx, kv_idx: layout[(q_idx + offset) // size, kv_idx // size]
    return lambda b, h, q_idx, kv_idx: pattern.allows(q_idx + offset, kv_idx)


# Below this many (query, key) pairs the block mask is built eagerly from the dense predicate
# (16 MiB of booleans at most), which is far quicker than compiling the builder.
_EAGER_BLOCK_MASK_PAIRS = 2**24


@functools.cache
def _compiled_flex():
    """``torch.compile(flex_attention)``, made once per process and shared by every workload.

    Dynamo still compiles one graph per pattern and shape (each ``mask_mod`` is traced into the
    kernel), but the wrapper, its caches and the import are not repeated per contender list.
    """
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(pattern: Pattern) -> tuple[Optional[AttentionFn], Optional[str]]:
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError:
        return None, "FlexAttention is not in this torch"

    @functools.lru_cache(maxsize=4)
    def block_mask(n_q: int, n_k: int, device: torch.device):
        return create_block_mask(
            _mask_mod(pattern, n_k - n_q), None, None, n_q, n_k, device=str(device), BLOCK_SIZE=FLEX_BLOCK,
            _compile=n_q * n_k > _EAGER_BLOCK_MASK_PAIRS,
        )

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        mask = block_mask(q.shape[2], k.shape[2], q.device)
        return _compiled_flex()(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1])

    return run, None


def _local_attention(window: SlidingWindow) -> tuple[Optional[AttentionFn], Optional[str]]:
    try:
        from local_attention import LocalAttention
    except ImportError:
        return None, 'local-attention is not installed (pip install "attnkit[bench]")'
    if window.size < 2:
        return None, "local-attention needs a window of at least 2 keys"
    module = LocalAttention(
        window_size=window.size - 1, causal=True, look_backward=1, look_forward=0,
        exact_windowsize=True, autopad=True, dropout=0.0, use_rotary_pos_emb=False,
    )

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        groups = q.shape[1] // k.shape[1]
        if groups > 1:  # it has no GQA: K/V must be repeated
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        return module(q, k, v)

    return run, None


def sparse_contenders(workload: Workload) -> list[Contender]:
    """The contenders of a sparse workload, the masked-SDPA baseline first; peers that cannot
    run here come back as skipped (``fn=None``) with a note."""
    pattern = workload.pattern
    found = [Contender("torch sdpa (masked)", _sdpa_direct(pattern), baseline=True)]
    for backend in ("auto", "sparse", "blockwise"):
        found.append(Contender(f"attnkit {backend}", _attnkit(pattern, backend)))
    flex, note = _flex(pattern)
    found.append(Contender("flex (compiled)", flex, note=note or "inference only on CPU", forward_only=True,
                            compiled=True))
    band = pattern.band()
    if isinstance(pattern, SlidingWindow) and pattern.causal and band is not None:
        local, note = _local_attention(pattern)
        found.append(Contender("local-attention", local, note=note or f"window_size={pattern.size - 1}, look_backward=1, exact"))
    return found
