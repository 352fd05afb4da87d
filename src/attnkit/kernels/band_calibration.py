"""Whether bands run the native kernel or the sparse planner on this machine: known for the
vector paths measured, else calibrated once per machine (both paths timed on a window and on
Strided). It sits above both kernels: it times :func:`~attnkit.kernels.sparse.sparse_kernel` with
``native_bands`` True and False. The sparse backend asks :func:`band_decision` and passes the
answer to the kernel; nothing here changes a kernel's behaviour."""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from ..patterns import Pattern, SlidingWindow, Strided
from .native_build import add_status_note, cpu_identity, load_native
from .sparse import sparse_kernel

KNOWN_FAST = ("avx512", "avx2")
"""Vector paths measured faster than the planner for windows and Strided's band (benchmarks/RESULTS.md,
"The native band kernel on every ISA"); other paths (generic, NEON) are calibrated."""
_CALIBRATION_SEQ, _CALIBRATION_HEADS, _CALIBRATION_REPEATS, _CALIBRATION_BUDGET_S = 1024, 2, 5, 0.05
_deciding = threading.RLock()  # one calibration at a time: concurrent ones would time each other
_decisions: dict[str, "BandDecision"] = {}  # by record path (library and threads): decided in this process


@dataclass(frozen=True)
class BandDecision:
    """Whether bands run the native kernel (else the planner), and why. For a calibration, the best
    forward milliseconds of each path on a window and on Strided (native runs its band part)."""

    native: bool
    reason: str
    window_ms: tuple[float, float] = (0.0, 0.0)  # (native, planner)
    strided_ms: tuple[float, float] = (0.0, 0.0)


def band_decision() -> BandDecision:
    """The decision for the library ``$ATTNKIT_NATIVE_ISA`` selects: native for a known-fast vector
    path, else the faster of the two in a calibration (tens of milliseconds on a quiet machine, more
    on a loaded one), run once and cached next to the library, keyed by the CPU, the library's
    checksum and the thread count. Native is the answer only when the kernel is not slower overall
    (geometric mean of its time ratios on a window and on Strided)."""
    built = load_native("band_attention")
    if built.library is None:
        return BandDecision(False, f"the planner (no native library: {built.message})")
    return _decide(str(built.path), built.isa)


def _calibration_key(library_path: str) -> str:
    """The CPU, the library's checksum and the thread count (the planner's torch kernels and the
    native kernel's threads do not scale alike)."""
    try:
        with open(library_path + ".sum", encoding="utf-8") as record:
            checksum = record.read().strip()
    except OSError:  # the cache was cleaned under this process: a key no record matches
        checksum = "unknown"
    return f"{cpu_identity()}\n{checksum}\nthreads {torch.get_num_threads()}"


def _decide(library_path: str, isa: str) -> BandDecision:
    path = isa.split(" ")[0]
    if path in KNOWN_FAST:
        return BandDecision(True, f"native kernel (the {path} path is known fast)")
    record_path = library_path + f".choice-{torch.get_num_threads()}.json"
    with _deciding:
        if record_path not in _decisions:
            _decisions[record_path] = _stored_or_calibrated(library_path, record_path)
        return _decisions[record_path]


def _stored_decision(record_path: str, key: str) -> Optional[BandDecision]:
    """The decision recorded for ``key``, or None when there is none or the record is damaged."""
    try:
        with open(record_path, encoding="utf-8") as record:
            stored = json.load(record)
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.get("key") != key or type(stored.get("native")) is not bool:
        return None
    try:
        window, strided = (tuple(float(ms) for ms in stored[name]) for name in ("window_ms", "strided_ms"))
        return BandDecision(stored["native"], str(stored["reason"]), window, strided)
    except (KeyError, TypeError, ValueError):
        return None


def _stored_or_calibrated(library_path: str, record_path: str) -> BandDecision:
    key = _calibration_key(library_path)
    stored = _stored_decision(record_path, key)
    if stored is not None:
        return stored
    try:
        decision = _calibrate()
    except (RuntimeError, OSError, ValueError) as failure:  # keep the exact path known to run
        decision = BandDecision(False, f"the planner (the calibration failed: {failure})")
    try:
        handle, temporary = tempfile.mkstemp(dir=os.path.dirname(record_path), suffix=".tmp")
        with os.fdopen(handle, "w", encoding="utf-8") as record:
            json.dump({"key": key, **asdict(decision)}, record)
        os.replace(temporary, record_path)
    except OSError:
        pass  # a read-only cache: decide again in the next process
    return decision


def _best_ms(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """The fastest of up to ``repeats`` timed calls of each run, in milliseconds, the runs taking
    turns after a warm-up each: on a busy machine the fastest call is the one least disturbed. Rounds
    stop early once they took _CALIBRATION_BUDGET_S (a loaded machine makes every call slow)."""
    for run in runs.values():
        run()
    best = {name: math.inf for name in runs}
    started = time.perf_counter()
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], (time.perf_counter() - start) * 1e3)
        if time.perf_counter() - started > _CALIBRATION_BUDGET_S:
            break
    return best


def _calibrate() -> BandDecision:
    """Times both paths on SlidingWindow(256) and Strided(128) at N=1024, 2 heads, D=64 (forward;
    the backward passes scale alike)."""
    def on(path: str, pattern: Pattern) -> Callable[[], object]:
        return lambda: sparse_kernel(q, k, v, pattern, 64**-0.5, native_bands=path == "native")

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, _CALIBRATION_HEADS, _CALIBRATION_SEQ, 64, generator=gen) for _ in range(3))
    measured = []
    with torch.no_grad():
        for pattern in (SlidingWindow(256), Strided(128)):
            best = _best_ms({path: on(path, pattern) for path in ("native", "planner")}, _CALIBRATION_REPEATS)
            measured.append((best["native"], best["planner"]))
    ratio = math.sqrt(math.prod(native / planner for native, planner in measured))
    winner = "native kernel" if ratio <= 1.0 else "the planner"
    reason = (f"{winner} (calibrated here: native / planner {ratio:.2f}; window {measured[0][0]:.1f} / "
              f"{measured[0][1]:.1f} ms, strided {measured[1][0]:.1f} / {measured[1][1]:.1f} ms)")
    return BandDecision(ratio <= 1.0, reason, measured[0], measured[1])


add_status_note("band_attention", lambda: band_decision().reason)


__all__ = ["BandDecision", "KNOWN_FAST", "band_decision"]
