"""GPU workloads for ``attnkit bench --device cuda`` and the contenders measured on them.

The shapes of issue 10: B=2, H=16, D=128, bfloat16. Case sets (``--case``):

- ``gpu-causal``: Causal (SDPA's own ground: attnkit auto must stay on it);
- ``gpu-window`` / ``gpu-window4096``: SlidingWindow(256) / SlidingWindow(4096);
- ``gpu-strided``: Strided(128); ``gpu-fixed``: Fixed(128, 8);
- ``gpu-blocksparse``: the BigBird-like layout of :func:`~attnkit.bench.sparse_cases.bigbird_layout`;
- ``gpu-decode``: one decoding step, a single query against ``N`` cached keys, SlidingWindow(4096).

Contenders: ``torch sdpa`` (``is_causal`` or a boolean mask built once per shape; the baseline),
``flex (compiled)`` (``torch.compile(flex_attention)``, block mask built once per shape, with its
own GPU backward), and attnkit's backends less :data:`LEFT_OUT`: ``auto``, ``sparse`` (the
planner; its backward is left out where its band units would not fit in memory) and ``triton``
(skipped with the reason where it cannot run). GFLOP/s count the allowed pairs only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..kernels.triton_backend import triton_available
from ..patterns import BlockSparse, Causal, Fixed, SlidingWindow, Strided
from .contenders import Contender, attnkit_backend, backends_to_time, sdpa_direct
from .peers import flex
from .sparse_cases import bigbird_layout
from .workload import Workload

GPU_SHAPE = dict(batch=2, heads=16, kv_heads=16, head_dim=128, dtype=torch.bfloat16)
_PLANNER_BACKWARD_PAIRS = 1 << 26  # band pairs per head above which the planner's backward ran out of memory
LEFT_OUT = (
    "reference",  # materialises (B, H, N, N) weights: gigabytes at these lengths
    "dense",  # SDPA with the pattern as a mask: the baseline row already
    "blockwise",  # the CPU tiling in torch ops: the planner and the Triton kernel are the GPU paths
)


@dataclass(frozen=True)
class DecodeWorkload(Workload):
    """``queries`` new query rows against ``seq`` cached keys (bottom-right aligned)."""

    queries: int = 1

    @property
    def allowed_pairs(self) -> int:
        return self.pattern.count(self.queries, self.seq) * self.batch * self.heads

    def inputs(self, seed: int = 0, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().inputs(seed, device)
        return q[:, :, -self.queries:].contiguous(), k, v


def _workloads(case: str, pattern_of: Callable[[int], object]) -> Callable[[tuple[int, ...]], list[Workload]]:
    return lambda seqs: [Workload(case, pattern_of(seq), seq, **GPU_SHAPE) for seq in seqs]


def _decode(seqs: tuple[int, ...]) -> list[Workload]:
    return [DecodeWorkload("gpu-decode", SlidingWindow(4096), seq, **GPU_SHAPE) for seq in seqs]


GPU_CASE_SETS: dict[str, Callable[[tuple[int, ...]], list[Workload]]] = {
    "gpu-causal": _workloads("gpu-causal", lambda n: Causal()),
    "gpu-window": _workloads("gpu-window", lambda n: SlidingWindow(256)),
    "gpu-window4096": _workloads("gpu-window4096", lambda n: SlidingWindow(4096)),
    "gpu-strided": _workloads("gpu-strided", lambda n: Strided(128)),
    "gpu-fixed": _workloads("gpu-fixed", lambda n: Fixed(128, 8)),
    "gpu-blocksparse": _workloads("gpu-blocksparse", lambda n: BlockSparse(bigbird_layout(-(-n // 128)), 128)),
    "gpu-decode": _decode,
}


def gpu_contenders(workload: Workload) -> list[Contender]:
    """The contenders of a GPU workload, SDPA first; ones that cannot run here are skipped."""
    pattern = workload.pattern
    sdpa = "torch sdpa" if isinstance(pattern, Causal) else "torch sdpa (masked)"
    found = [Contender(sdpa, sdpa_direct(pattern), baseline=True)]
    flex_fn, note = flex(pattern)
    found.append(Contender("flex (compiled)", flex_fn, note=note, compiled=True,
                           forward_only=not torch.cuda.is_available()))
    for backend in backends_to_time(LEFT_OUT):
        found.append(_attnkit_contender(workload, backend))
    return found


def _attnkit_contender(workload: Workload, backend: str) -> Contender:
    """attnkit on ``backend``, with what the GPU table knows about it: the Triton kernel may be
    unavailable here, and the planner's backward does not fit in memory on long bands."""
    pattern = workload.pattern
    fn = attnkit_backend(pattern, backend)
    if backend == "triton":
        reason = triton_available(None if torch.cuda.is_available() else torch.device("cpu"))
        return Contender("attnkit triton", None if reason else fn, note=reason)
    if backend == "sparse":
        band = pattern.band()
        heavy = band is not None and (band[1] - band[0]) * workload.seq > _PLANNER_BACKWARD_PAIRS
        return Contender("attnkit sparse", fn, forward_only=heavy,
                         note="forward only: its backward ran out of memory here" if heavy else None)
    return Contender(f"attnkit {backend}", fn)
