"""``attnkit ring``: run a sequence-parallel scheme on random long-context data over N local processes.

``--scheme ring`` (default) runs ring attention, ``ulysses`` DeepSpeed-Ulysses' all-to-all over
heads, ``hybrid`` Ulysses inside groups of ``--ulysses-degree`` ranks and a ring across them.

The command launches itself under ``torchrun`` (``python -m torch.distributed.run``) with
``--nproc`` workers on this machine, joined over loopback at a port found free at start, and
shows the phase each rank is in (forward, backward, ...) while they run. Each
worker runs :mod:`.ring_worker` (:mod:`attnkit.distributed.worker` does the work); rank 0 writes
every rank's report to a scratch directory, and this command prints a table of per-rank time,
compute load, bytes sent (counted by a wrapper around torch.distributed, beside the cost model's
figure) and peak memory, and (when the full problem is small enough, or with
``--check``) the relative errors of out, dq, dk and dv against single-process float64 attention.

Errors (a bad argument, a sequence the layout cannot split, a worker that fails, dies or times
out) end the command with one line and exit code 2, like every other subcommand; for a failed
worker the line is the error of the rank that failed first (see :func:`failure`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..distributed.agreement import SCHEMES
from ..distributed.comm import DEFAULT_TIMEOUT_S, is_lost_connection
from ..distributed.launch import free_port
from ..distributed.layouts import LAYOUTS, check_split
from ..distributed.ring_case import CASE_VARIABLE, RESULT_FILE, RingCase, case_to_json, phase_file
from .pattern_args import parse_pattern, pattern_syntax

CHECK_AUTO_LIMIT = 16384
"""``--check auto`` compares with single-process attention up to this many tokens."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ring",
        help="ring, Ulysses or hybrid sequence-parallel attention over N local processes on random data",
        description="Launches N workers with torchrun (gloo on CPU, NCCL on GPU), runs a sequence-parallel "
        "scheme (ring, Ulysses, or the Ulysses x ring hybrid) forward + backward on random shards, and "
        "reports per-rank time, compute load, bytes sent (measured, and the cost model's figure) and "
        "peak memory; checks against single-process attention when it fits.",
    )
    parser.add_argument("--scheme", default="ring", choices=SCHEMES,
                        help="ring: K/V go round a ring; ulysses: all-to-all over heads (at most --heads "
                        "ranks); hybrid: Ulysses in groups of --ulysses-degree ranks, a ring across "
                        "them (default ring)")
    parser.add_argument("--ulysses-degree", type=int, default=None,
                        help="hybrid only: ranks per Ulysses group, dividing --nproc (default: the largest "
                        "divisor of --nproc below it that is at most --heads)")
    parser.add_argument("--nproc", type=int, default=2, help="number of processes (ranks) (default 2)")
    parser.add_argument("--seq", type=int, default=8192, help="total sequence length N (default 8192)")
    parser.add_argument("--batch", type=int, default=1, help="batch size B (default 1)")
    parser.add_argument("--heads", type=int, default=8, help="query heads Hq (default 8)")
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads Hkv (default Hq)")
    parser.add_argument("--head-dim", type=int, default=64, help="head width D (default 64)")
    parser.add_argument("--pattern", default="causal",
                        help=f"{pattern_syntax()} (default causal)")
    parser.add_argument("--layout", default="zigzag", choices=LAYOUTS, help="shard layout (default zigzag)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16", "float16"),
                        help="dtype of q, k, v and the gradients (default float32; the check compares "
                        "with float64 either way)")
    parser.add_argument("--check", default="auto", choices=("auto", "yes", "no"),
                        help=f"compare with single-process attention (auto: N <= {CHECK_AUTO_LIMIT})")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help=f"seconds a rank waits for a peer before failing (default {DEFAULT_TIMEOUT_S:g})")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--json", metavar="PATH", help="write every rank's report as JSON")
    parser.set_defaults(func=run)


def _positive(name: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"--{name} must be positive, got {value}")


def case_from_args(args: argparse.Namespace, work_dir: str) -> RingCase:
    """The case the options describe; ValueError (or FileNotFoundError) naming a bad option."""
    for name in ("nproc", "seq", "batch", "heads", "head_dim"):
        _positive(name.replace("_", "-"), getattr(args, name))
    kv_heads = args.heads if args.kv_heads is None else args.kv_heads
    _positive("kv-heads", kv_heads)
    if args.heads % kv_heads:
        raise ValueError(f"--heads ({args.heads}) must be a multiple of --kv-heads ({kv_heads})")
    if not 0 < args.timeout < float("inf"):
        raise ValueError(f"--timeout must be a positive, finite number of seconds, got {args.timeout}")
    check_split(args.seq, args.layout, args.nproc)
    ulysses_degree = _ulysses_degree(args)
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise FileNotFoundError(f"directory of --json {args.json} does not exist")
    pattern = parse_pattern(args.pattern)
    check = args.check == "yes" or (args.check == "auto" and args.seq <= CHECK_AUTO_LIMIT)
    return RingCase(
        args.seq, args.batch, args.heads, kv_heads, args.head_dim, pattern, args.pattern, args.layout,
        args.dtype, check, args.timeout, args.seed, work_dir, args.scheme, ulysses_degree,
    )


def _ulysses_degree(args: argparse.Namespace) -> int:
    """Ranks per Ulysses group of the scheme; ValueError naming the option when it cannot run."""
    if args.ulysses_degree is not None and args.scheme != "hybrid":
        raise ValueError(f"--ulysses-degree is for --scheme hybrid, not {args.scheme}")
    if args.scheme == "ring":
        return 1
    if args.scheme == "ulysses":
        if args.nproc > args.heads:
            raise ValueError(f"--scheme ulysses needs --nproc ({args.nproc}) at most --heads ({args.heads}): "
                             "each rank computes whole heads; --scheme hybrid runs a ring across the rest")
        return args.nproc
    if args.ulysses_degree is None:
        divisors = [d for d in range(2, min(args.nproc - 1, args.heads) + 1) if args.nproc % d == 0]
        if not divisors:
            raise ValueError(f"--scheme hybrid needs --ulysses-degree: {args.nproc} ranks have no divisor "
                             f"between 2 and {min(args.nproc - 1, args.heads)}")
        return divisors[-1]
    _positive("ulysses-degree", args.ulysses_degree)
    if args.nproc % args.ulysses_degree or args.ulysses_degree > args.heads:
        raise ValueError(f"--ulysses-degree ({args.ulysses_degree}) must divide --nproc ({args.nproc}) and be "
                         f"at most --heads ({args.heads})")
    return args.ulysses_degree


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def print_report(case: RingCase, result: dict) -> None:
    """A rich table of every rank's report (rank 0's result file), balance and check errors."""
    reports = result["reports"]
    world = len(reports)
    grid = {"ring": "", "ulysses": "", "hybrid": f" ({case.ulysses_degree} x {world // case.ulysses_degree})"}
    title = (f"attnkit ring: N={case.seq:,} B={case.batch} Hq={case.heads} Hkv={case.kv_heads} "
             f"D={case.head_dim} {case.pattern_name} {case.layout} {case.dtype}, {world} ranks, "
             f"{case.scheme}{grid[case.scheme]}")
    table = Table(title=title)
    for column in ("rank", "positions", "fwd s", "bwd s", "kernel s", "kernel CPU s", "wait s",
                   "steps (computed/run)", "sent MiB", "model MiB", "peak MiB"):
        table.add_column(column, justify="left" if column == "positions" else "right")
    for r in reports:
        table.add_row(
            str(r["rank"]), r["positions"], f"{r['forward_s']:.2f}", f"{r['backward_s']:.2f}",
            f"{r['compute_s']:.2f}", f"{r['compute_cpu_s']:.2f}", f"{r['wait_s']:.2f}",
            f"{r['computed_steps']}/{r['steps']}", _mib(r["bytes_sent"]), _mib(r["model_bytes"]), _mib(r["peak_rss"]),
        )
    console = Console(width=None if sys.stdout.isatty() else 160)  # a log file gets whole rows
    console.print(table)
    loads = [r["compute_cpu_s"] for r in reports]
    total = max(r["forward_s"] + r["backward_s"] for r in reports)
    console.print(f"forward + backward: {total:.2f} s (slowest rank); load balance (kernel CPU s): "
                  f"max/min = {max(loads) / max(min(loads), 1e-9):.3f}, max/mean = "
                  f"{max(loads) / max(sum(loads) / len(loads), 1e-9):.3f}")
    console.print("sent MiB: counted by a wrapper around every torch.distributed send (agreement check "
                  "included); model MiB: the cost model (docs/parallel.md); steps: ring steps, summed over "
                  "the hybrid's rounds of heads, none for Ulysses")
    console.print("peak MiB: peak resident memory of the process (CPU) or peak CUDA allocation (GPU)")
    if result["errors"] is not None:
        errors = ", ".join(f"{name} {err:.1e}" for name, err in result["errors"].items())
        console.print(f"max relative error vs single-process float64 attention: {errors}")
    elif not case.check:
        console.print(f"not checked against single-process attention (N > {CHECK_AUTO_LIMIT}; --check yes forces it)")


def _rank_errors(work_dir: str) -> dict[int, tuple[str, str, float]]:
    """rank -> (exception type, first line, time.time() when written) of every worker that
    reported an error (the time is infinite when the file has none)."""
    errors = {}
    for name in os.listdir(work_dir):
        match = re.fullmatch(r"rank(\d+)\.txt", name)
        if match:
            with open(os.path.join(work_dir, name)) as handle:
                kind, message, stamp = (handle.read().split("\n", 2) + ["", ""])[:3]
            try:
                when = float(stamp)
            except ValueError:
                when = float("inf")
            errors[int(match[1])] = (kind, message, when)
    return errors


_CONSEQUENCE = re.compile(r"\blost rank \d+|\bgave up on\b|\bpeer died\b|\btimed out\b", re.IGNORECASE)


def _is_consequence(message: str) -> bool:
    """Whether a rank's error only says that another rank went away: a lost connection or a wait
    that timed out, which follow from some other rank's failure rather than cause one."""
    return bool(_CONSEQUENCE.search(message)) or is_lost_connection(message)


def _root_cause(stderr: str) -> Optional[tuple[int, int]]:
    """(rank, exit code) of torchrun's "Root Cause (first observed failure)", if it printed one."""
    _, found, section = stderr.partition("Root Cause")
    rank, code = re.search(r"\brank\s*:\s*(\d+)", section), re.search(r"exitcode\s*:\s*(-?\d+)", section)
    return (int(rank[1]), int(code[1])) if found and rank and code else None


def _how_it_ended(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def failure(stderr: str, returncode: int, work_dir: str) -> Exception:
    """The one-line error of a failed launch, the cause rather than its consequences.

    A rank's own error (bad input, a crash of its own) wins over what other ranks saw as a
    consequence (a lost connection, a timeout), the earliest first by the time each rank wrote
    it. Failing that, torchrun's root cause (its timestamps are whole seconds, so it mostly names
    rank 0 and is used only here): a rank that died without a word (killed, out of memory) is named
    with its signal or exit code and what another rank saw. Then the earliest consequence; then
    the last line of stderr that is not one of torchrun's ``====`` rules.
    """
    errors = _rank_errors(work_dir)
    own = {rank: error for rank, error in errors.items() if not _is_consequence(error[1])}
    cause = _root_cause(stderr)
    if not own and cause is not None and cause[0] not in errors:
        rank, code = cause
        seen = min(errors.items(), key=lambda item: (item[1][2], item[0]), default=None)
        consequence = f"; rank {seen[0]} then saw: {seen[1][1]}" if seen else ""
        return RuntimeError(f"rank {rank} {_how_it_ended(code)} without reporting an error{consequence}")
    if errors:
        first = min(own or errors, key=lambda rank: ((own or errors)[rank][2], rank))
        kind, message, _ = errors[first]
        return ValueError(message) if kind == "ValueError" else RuntimeError(f"{kind}: {message}")
    lines = [line.strip() for line in stderr.splitlines() if line.strip().strip("=-")]
    return RuntimeError(f"torchrun failed: {lines[-1] if lines else f'exit code {returncode}'}")


def _report_result(case: RingCase, work_dir: str, json_path: Optional[str]) -> None:
    """Print rank 0's result and save it to ``json_path``, if rank 0 finished its work (it may
    have, even when a later barrier failed)."""
    result_path = os.path.join(work_dir, RESULT_FILE)
    if not os.path.exists(result_path):
        return
    with open(result_path) as handle:
        result = json.load(handle)
    print_report(case, result)
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(result, handle, indent=2)


def _phases(case: RingCase, world: int) -> str:
    """``"rank 0 forward · rank 1 backward"``: what each rank said it is doing (see
    :func:`~attnkit.distributed.ring_case.phase_file`), ``starting`` before it says."""
    said = []
    for rank in range(world):
        try:
            with open(phase_file(case.work_dir, rank)) as handle:
                said.append(f"rank {rank} {handle.read()}")
        except FileNotFoundError:
            said.append(f"rank {rank} starting")
    return " · ".join(said)


def _wait_showing_phases(process: subprocess.Popen, case: RingCase, world: int, poll_s: float = 0.5) -> str:
    """Wait for torchrun and return its stderr, showing each rank's phase meanwhile: a live line
    with the elapsed time on a terminal (stderr), else one line on stdout each time the phases
    change (so a redirected long run is never silent, and stderr keeps only the one-line error)."""
    console = Console(stderr=True)
    start, shown = time.perf_counter(), None
    with contextlib.ExitStack() as stack:
        progress = None
        if console.is_terminal:
            progress = stack.enter_context(Progress(SpinnerColumn(), TextColumn("{task.description}"),
                                                    TimeElapsedColumn(), console=console, transient=True))
            task = progress.add_task("launching")
        while True:
            try:
                return process.communicate(timeout=poll_s)[1]
            except subprocess.TimeoutExpired:
                phases = _phases(case, world)
                if progress is not None:
                    progress.update(task, description=escape(phases))
                elif phases != shown:
                    print(f"[{time.perf_counter() - start:8.1f} s] {phases}", flush=True)
                shown = phases


STOP_GRACE_S = 20.0
"""Seconds torchrun gets to stop its workers before it is killed."""


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _stop(process: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """End torchrun and its workers. The workers run in sessions of their own, out of reach of a
    signal to torchrun's group, and a torchrun killed outright leaves them running (a 1M-token
    case holds gigabytes per rank for minutes): SIGTERM lets torchrun stop them first; SIGKILL
    follows after ``grace_s``."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.communicate(timeout=grace_s)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()


def run(args: argparse.Namespace) -> int:
    work_dir = tempfile.mkdtemp(prefix="attnkit-ring-")
    try:
        case = case_from_args(args, work_dir)
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
            "--nproc-per-node", str(args.nproc), "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), "--max-restarts", "0",
            "-m", "attnkit.cli.ring_worker",
        ]
        env = {**os.environ, CASE_VARIABLE: case_to_json(case), "OMP_NUM_THREADS": "1"}
        process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
        # A SIGTERM (``timeout``, ``kill``) ends this command through the handler below, as Ctrl-C
        # does, instead of leaving torchrun and its workers running on their own.
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            stderr = _wait_showing_phases(process, case, args.nproc)
        except BaseException:
            _stop(process)
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
        # A failed launch's error is settled before the report: should printing rank 0's result
        # fail as well, the user still learns the cause rather than that consequence.
        error = failure(stderr, process.returncode, work_dir) if process.returncode != 0 else None
        try:
            _report_result(case, work_dir, args.json)
        except Exception as exc:
            if error is None:
                raise
            raise error from exc
        if error is not None:
            raise error
        return 0
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
