"""Start a local process group on loopback and run a function on every rank, with a deadline.

Used by the tests and the benchmark (the ``attnkit ring`` command uses ``torchrun`` instead). Each
rank is a fresh ``spawn``-ed Python process that joins a ``gloo`` group on ``127.0.0.1`` at a
port that was free a moment before; tensors in the results come back as tensors. The whole run has
a deadline: processes still alive after it are killed and ``TimeoutError`` is raised.
"""

from __future__ import annotations

import os
import queue
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the OS just reported free (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RankResult:
    """What one rank's function returned (``ok``) or the one-line error it raised, and the
    process's exit code (negative: killed by that signal, as when it outlived the deadline)."""

    rank: int
    ok: bool
    value: Any = None
    error: str = ""
    exit_code: Optional[int] = None


def _convert(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {key: _convert(item, fn) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_convert(item, fn) for item in value)
    return value


def _to_wire(tensor: torch.Tensor):
    return ("tensor", tensor.detach().cpu().numpy())


def _entry(rank, world_size, port, timeout_s, threads, fn, args, results) -> None:
    torch.set_num_threads(threads)
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        value = fn(rank, world_size, *args)
        results.put((rank, True, _convert(value, _to_wire), ""))
    except BaseException as exc:  # reported to the parent, which decides
        results.put((rank, False, None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _from_wire(value: Any) -> Any:
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "tensor":
        return torch.from_numpy(value[1])
    if isinstance(value, dict):
        return {key: _from_wire(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_from_wire(item) for item in value)
    return value


def run_group(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    deadline_s: float = 120.0,
    group_timeout_s: float = 60.0,
    threads: int | None = None,
    absent: Sequence[int] = (),
    exit_grace_s: float = 5.0,
) -> list[RankResult]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` new processes joined in a gloo group.

    ``fn`` must be importable (a module-level function). ``group_timeout_s`` is the process
    group's own timeout (rendezvous included); ``deadline_s`` bounds the whole run. Ranks in
    ``absent`` are never started (to test a peer that never joins). ``threads`` per process
    defaults to the CPU count divided among the ranks. Returns one :class:`RankResult` per
    started rank, in rank order; a process still alive ``exit_grace_s`` after the last result is
    killed (its ``exit_code`` is then negative).
    """
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    processes = {}
    for rank in range(world_size):
        if rank in absent:
            continue
        process = context.Process(
            target=_entry, args=(rank, world_size, port, group_timeout_s, threads, fn, args, results),
            daemon=True,
        )
        process.start()
        processes[rank] = process
    collected: dict[int, RankResult] = {}
    end = time.monotonic() + deadline_s
    try:
        while len(collected) < len(processes):
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"ranks {sorted(set(processes) - set(collected))} gave no result within {deadline_s:g} s"
                )
            try:
                rank, ok, value, error = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in processes.items() if r not in collected and not p.is_alive()]
                for r in dead:  # exited without reporting (killed, os._exit)
                    if results.empty():
                        collected[r] = RankResult(r, False, error=f"process exited with code {processes[r].exitcode}")
                continue
            collected[rank] = RankResult(rank, ok, _from_wire(value), error)
    finally:
        for process in processes.values():
            process.join(timeout=exit_grace_s)
            if process.is_alive():
                process.kill()
                process.join()
    for rank, result in collected.items():
        result.exit_code = processes[rank].exitcode
    return [collected[r] for r in sorted(collected)]
