"""Sparse workloads for ``attnkit bench`` and the peers they are measured against.

Case sets ``window`` (SlidingWindow(256)), ``strided`` (Strided(128)), ``fixed`` (Fixed(128, 8)) and
``blocksparse`` (a BigBird-like layout: three local blocks and the first block as global, blocks of
128), B=1, H=8, D=64, float32. Contenders, all on the same inputs:

- ``torch sdpa``: the baseline, SDPA with the pattern as a boolean mask (built once per shape);
- attnkit's backends (``auto`` first), less the ones named in :data:`LEFT_OUT`;
- ``flex (compiled)`` (see :mod:`.peers`; forward only: FlexAttention has no CPU backward);
- ``local-attention`` (windows only, see :mod:`.peers`).

A peer that is not installed is skipped with a note in the table.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..patterns import BlockSparse, Fixed, SlidingWindow, Strided
from .contenders import Contender, attnkit_backend, backends_to_time, sdpa_direct
from .peers import flex, local_attention
from .workload import Workload

QUICK_SPARSE_SEQS = (512,)
"""``--quick`` runs each sparse case at one length: every workload compiles FlexAttention anew."""

LEFT_OUT = (
    "dense",  # SDPA with the pattern as a mask: the baseline row already
    "reference",  # materialises (B, H, N, N) weights: the error column compares with it anyway
    "triton",  # a GPU kernel: the gpu-* case sets time it
)


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


def sparse_contenders(workload: Workload) -> list[Contender]:
    """The contenders of a sparse workload, the masked-SDPA baseline first; peers that cannot
    run here come back as skipped (``fn=None``) with a note."""
    pattern = workload.pattern
    found = [Contender("torch sdpa (masked)", sdpa_direct(pattern), baseline=True)]
    for backend in backends_to_time(LEFT_OUT):
        found.append(Contender(f"attnkit {backend}", attnkit_backend(pattern, backend)))
    flex_fn, note = flex(pattern)
    found.append(Contender("flex (compiled)", flex_fn, note=note or "inference only on CPU", forward_only=True,
                           compiled=True))
    band = pattern.band()
    if isinstance(pattern, SlidingWindow) and pattern.causal and band is not None:
        local, note = local_attention(pattern)
        found.append(Contender("local-attention", local, note=note or f"window_size={pattern.size - 1}, look_backward=1, exact"))
    return found
