"""The registry of what ``attnkit bench`` measures: case sets and the contenders of each.

A case set maps a name to a function ``seqs -> [Workload]``; ``contenders_for`` lists every
implementation that can run a workload, attnkit's backends and the peers, side by side. The
causal foundation case lives here; the sparse and GPU case sets live in their own modules and
register below.
"""

from __future__ import annotations

from typing import Callable

from ..patterns import Causal
from .contenders import Contender, attnkit_backend, backends_to_time, sdpa_direct
from .gpu_cases import GPU_CASE_SETS, gpu_contenders
from .sparse_cases import SPARSE_CASE_SETS, sparse_contenders
from .workload import Workload

REFERENCE_MAX_SEQ = 2048  # the explicit reference materialises (B, H, N, N) weights
DEFAULT_SEQS = (1024, 4096, 8192)
QUICK_SEQS = (256, 1024)
LEFT_OUT = (
    "sparse",  # the planner's plan for Causal is one SDPA call: the dense row
    "triton",  # a GPU kernel: the gpu-* case sets time it
)


def causal_case(seqs: tuple[int, ...]) -> list[Workload]:
    """The foundation workload: causal, B=1, H=8, D=64, float32."""
    return [Workload("causal", Causal(), seq) for seq in seqs]


def causal_contenders(workload: Workload) -> list[Contender]:
    """torch SDPA (the baseline), then attnkit's backends less :data:`LEFT_OUT`; the explicit
    reference only up to :data:`REFERENCE_MAX_SEQ`."""
    pattern = workload.pattern
    found = [Contender("torch sdpa", sdpa_direct(pattern), baseline=True)]
    for backend in backends_to_time(LEFT_OUT):
        if backend != "reference" or workload.seq <= REFERENCE_MAX_SEQ:
            found.append(Contender(f"attnkit {backend}", attnkit_backend(pattern, backend)))
    return found


CASE_SETS: dict[str, Callable[[tuple[int, ...]], list[Workload]]] = {
    "causal": causal_case,
    **SPARSE_CASE_SETS,
    **GPU_CASE_SETS,
}
_CONTENDERS: dict[str, Callable[[Workload], list[Contender]]] = {
    "causal": causal_contenders,
    **{name: sparse_contenders for name in SPARSE_CASE_SETS},
    **{name: gpu_contenders for name in GPU_CASE_SETS},
}


def contenders_for(workload: Workload) -> list[Contender]:
    """Every implementation that can run ``workload``, the SDPA baseline first."""
    return _CONTENDERS[workload.case](workload)


__all__ = ["CASE_SETS", "DEFAULT_SEQS", "QUICK_SEQS", "causal_case", "contenders_for"]
