"""Timing, error and memory measurement for ``attnkit bench``.

Times are medians over repeats after one warm-up call; contenders are timed interleaved. The error of every contender is measured
against float64 ``reference_attention`` on the last ``ERROR_ROWS`` query rows (bottom-right
alignment makes those rows a complete sub-problem), so it can be checked even where the full
reference would not fit in memory. The largest tensor an implementation allocates is recorded by a
dispatch mode in a separate, untimed call.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..functional import reference_attention
from .cases import contenders_for
from .contenders import Contender
from .memory import peak_memory_bytes
from .workload import Workload

ERROR_ROWS = 256


@dataclass
class BenchRow:
    """One contender on one workload."""

    case: str
    seq: int
    contender: str
    mode: str
    median_ms: float
    gflops: float
    vs_baseline: Optional[float]
    max_abs_err: float
    largest_tensor_mib: float
    note: str = ""
    peak_mib: Optional[float] = None

    def as_dict(self) -> dict:
        return asdict(self)


class _LargestTensor(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return result


def largest_tensor_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the largest tensor storage created by any operator while ``fn()`` runs."""
    with _LargestTensor() as mode:
        fn()
    return mode.largest


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def time_interleaved(
    fns: list[Callable[[], object]],
    repeats: int,
    device: torch.device = torch.device("cpu"),
    *,
    warm_up: bool = True,
) -> list[float]:
    """Median wall time in seconds of each of ``fns``, after one warm-up call each (unless
    ``warm_up=False``: the caller made them); CUDA work is synchronised around each call.

    The calls are interleaved round-robin (a, b, c, a, b, c, ...) so that a change in machine
    load during the run affects every contender alike and their ratios stay meaningful.
    """
    if warm_up:
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, record in zip(fns, times):
            record.append(_timed(fn, device))
    return [statistics.median(record) for record in times]


def _call(contender: Contender, q, k, v, backward: bool) -> Callable[[], object]:
    if not backward:
        def forward():
            with torch.no_grad():
                return contender.fn(q, k, v)
        return forward
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def forward_backward():
        out = contender.fn(*leaves)
        out.backward(torch.ones_like(out))
        return out

    return forward_backward


def _expected(workload: Workload, q, k, v) -> torch.Tensor:
    """float64 ``reference_attention`` on the last ``ERROR_ROWS`` query rows, computed once per
    workload and compared with every contender."""
    rows = min(ERROR_ROWS, workload.seq)
    expected, _ = reference_attention(q[..., -rows:, :].double(), k.double(), v.double(), workload.pattern)
    return expected


def _max_error(contender: Contender, expected: torch.Tensor, q, k, v) -> float:
    with torch.no_grad():
        out = contender.fn(q, k, v)[..., -expected.shape[-2]:, :]
    return float((out.double() - expected).abs().max())


def _mib(n_bytes: Optional[int]) -> Optional[float]:
    return None if n_bytes is None else n_bytes / 2**20


def _largest_mib(contender: Contender, call: Callable[[], object]) -> float:
    return float("nan") if contender.compiled else largest_tensor_bytes(call) / 2**20


def _runnable(workload: Workload, backward: bool) -> tuple[list[Contender], list[Contender]]:
    """The contenders that run on ``workload`` in this mode, and those skipped (``fn=None``)."""
    every = [c for c in contenders_for(workload) if not (backward and c.forward_only)]
    return [c for c in every if c.fn is not None], [c for c in every if c.fn is None]


def count_steps(workloads: Iterable[Workload], *, backward: bool = False) -> int:
    """How many times :func:`run_benchmark` calls ``on_step`` for these workloads."""
    return sum(2 * len(_runnable(w, backward)[0]) + 1 for w in workloads)


def run_benchmark(
    workloads: Iterable[Workload],
    *,
    repeats: int = 5,
    backward: bool = False,
    device: str = "cpu",
    on_step: Optional[Callable[[str], None]] = None,
) -> list[BenchRow]:
    """Time every contender on every workload, then check each one's error and memory;
    ``on_step(description)`` reports progress before each step: each contender's warm-up call
    (compiled peers compile there), the interleaved timing of a workload, and each contender's
    checks (:func:`count_steps` steps in all)."""
    mode = "fwd+bwd" if backward else "fwd"
    timed = []
    # Phase 1, timing only: the memory probe below changes how the process allocates (glibc is
    # told to mmap large blocks), which would slow every later timed call that allocates.
    for workload in workloads:
        q, k, v = workload.inputs(device=device)
        contenders, skipped = _runnable(workload, backward)
        calls = [_call(c, q, k, v, backward) for c in contenders]
        where = f"{workload.case} N={workload.seq}"
        for contender, call in zip(contenders, calls):  # the first call of a compiled peer compiles it
            if on_step:
                on_step(f"{where}: first call of {contender.name}" + (" (compiling)" if contender.compiled else ""))
            call()
        if on_step:
            on_step(f"{where}: timing {len(calls)} contenders, {repeats} rounds")
        seconds = time_interleaved(calls, repeats, q.device, warm_up=False)
        timed.append((workload, (q, k, v), contenders, skipped, calls, seconds))
    rows = []
    # Phase 2: errors, largest tensor and peak memory of every contender.
    for workload, (q, k, v), contenders, skipped, calls, seconds in timed:
        for contender in skipped:
            rows.append(BenchRow(workload.case, workload.seq, contender.name, mode, float("nan"), float("nan"),
                                 None, float("nan"), float("nan"), note=f"skipped: {contender.note}"))
        baseline_s = next((s for c, s in zip(contenders, seconds) if c.baseline), None)
        flops = workload.useful_flops * (3.5 if backward else 1.0)  # bwd ~ 2.5x the fwd matmuls
        expected = _expected(workload, q, k, v)
        for contender, call, t in zip(contenders, calls, seconds):
            if on_step:
                on_step(f"{workload.case} N={workload.seq}: checking {contender.name}")
            peak = _mib(peak_memory_bytes(call, q.device))  # before the dispatch-mode call below
            rows.append(
                BenchRow(
                    case=workload.case,
                    seq=workload.seq,
                    contender=contender.name,
                    mode=mode,
                    median_ms=t * 1e3,
                    gflops=flops / t / 1e9,
                    vs_baseline=None if baseline_s is None else t / baseline_s,
                    max_abs_err=_max_error(contender, expected, q, k, v),
                    largest_tensor_mib=_largest_mib(contender, call),
                    note=contender.note or "",
                    peak_mib=peak,
                )
            )
    return rows
