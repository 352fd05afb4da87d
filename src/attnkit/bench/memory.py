"""Peak memory of one call: what it adds on top of what the process held before it.

On CUDA this is torch's allocator peak. On Linux CPUs it is the process's peak resident memory
(``VmHWM``), reset before the call through ``/proc/self/clear_refs``: it counts every byte the call
touched, whoever allocated it (torch, oneDNN, a compiled kernel), minus what was resident before.
So that freed memory leaves the process instead of being reused unseen, glibc is told (once, on
the first measurement) to serve allocations of 64 KiB and more by ``mmap``, and to trim its heap
before each measurement. Elsewhere the measurement is unavailable and reported as None.
"""

from __future__ import annotations

import ctypes
import functools
import gc
from pathlib import Path
from typing import Callable, Optional

import torch

from ..models.checkpoint import c_library

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # the kernel reports kB
    raise RuntimeError(f"{field} missing from {_STATUS}")


_M_MMAP_THRESHOLD = -3  # mallopt parameter of glibc's malloc.h


@functools.lru_cache(maxsize=1)
def _glibc() -> Optional[ctypes.CDLL]:
    libc = c_library()
    try:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
        return libc
    except AttributeError:
        return None


def _cpu_peak(fn: Callable[[], object]) -> Optional[int]:
    libc = _glibc()
    try:
        gc.collect()
        if libc is not None:
            libc.malloc_trim(0)
        _CLEAR_REFS.write_text("5")  # resets VmHWM to the current resident size
        before = _status_bytes("VmRSS")
    except OSError:
        return None
    fn()
    return max(0, _status_bytes("VmHWM") - before)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Bytes by which ``fn()`` raised peak memory on ``device``; None where it cannot be measured."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    if device.type == "cpu" and _STATUS.exists():
        return _cpu_peak(fn)
    return None
