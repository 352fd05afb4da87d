"""One rank of ``attnkit ring``: random shards, one scheme's forward + backward, measurements.

Run under ``torchrun`` by the command's entry point (:mod:`attnkit.cli.ring_worker`), which
reads the :class:`~.ring_case.RingCase` and calls :func:`run_worker`. Each rank draws its own
random shard (seeded by rank), so no rank ever holds the full sequence; the full tensors are
defined as the assembly of the shards. When ``check`` is on, the shards, outputs and gradients are
gathered and rank 0 compares them with single-process float64 attention on the full tensors.
Bytes sent are counted by the wrapper of :mod:`.traffic` around every torch.distributed call the
scheme makes, and reported beside the cost model's figure (:mod:`.costs`). Rank 0 writes every
rank's report to the case's ``work_dir`` for the launcher to print.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from ..functional import attention
from .comm import gloo_reason, record_ring_stats
from .costs import CallShape, ring_steps, scheme_bytes
from .grid import make_grid
from .layouts import assemble, shard_positions
from .ring import ring_attention
from .ring_case import RESULT_FILE, RingCase, phase_file
from .traffic import count_traffic
from .ulysses import hybrid_attention, ulysses_attention

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RankReport:
    """One rank's measurements (times in seconds, sizes in bytes)."""

    rank: int
    positions: str
    forward_s: float
    backward_s: float
    compute_s: float
    compute_cpu_s: float
    wait_s: float
    steps: int
    computed_steps: int
    bytes_sent: int
    model_bytes: int
    peak_rss: int


def _spans(positions: torch.Tensor, limit: int = 3) -> str:
    """``"0-1023, 7168-8191"``: the contiguous runs of a sorted position vector."""
    breaks = (positions[1:] - positions[:-1] != 1).nonzero().flatten().tolist()
    starts = [0] + [b + 1 for b in breaks]
    stops = breaks + [len(positions) - 1]
    runs = [f"{int(positions[a])}-{int(positions[b])}" for a, b in zip(starts, stops)]
    return ", ".join(runs) if len(runs) <= limit else f"{runs[0]}, ... ({len(runs)} runs)"


def _random_shard(case: RingCase, rank: int, world: int, device: torch.device) -> dict:
    """This rank's q, k, v (leaves that require grad) and the output gradient ``d_out``: random
    when checking, else ones (the gradient of ``out.sum()``, broadcast, so it costs no memory)."""
    generator = torch.Generator().manual_seed(case.seed * 100_003 + rank)
    dtype = _DTYPES[case.dtype]
    size = case.seq // world
    q_shape = (case.batch, case.heads, size, case.head_dim)
    kv_shape = (case.batch, case.kv_heads, size, case.head_dim)
    shard = {
        name: torch.randn(shape, generator=generator).to(device, dtype).requires_grad_()
        for name, shape in (("q", q_shape), ("k", kv_shape), ("v", kv_shape))
    }
    if case.check:
        shard["d_out"] = torch.randn(q_shape, generator=generator).to(device, dtype)
    else:
        shard["d_out"] = torch.ones((), device=device, dtype=dtype).expand(q_shape)
    return shard


def _relative_errors(got: dict, expected: dict) -> dict:
    return {
        name: float((got[name].double() - expected[name]).abs().max() / expected[name].abs().max())
        for name in expected
    }


def _check_against_single_process(case: RingCase, shards: dict, results: dict, world: int) -> Optional[dict]:
    """Gather everything, compare on rank 0 with float64 attention; None on other ranks."""
    full = {}
    inputs = {name: tensor.detach() for name, tensor in shards.items()}
    for name, tensor in {**inputs, **results}.items():
        gathered = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(gathered, tensor.contiguous())
        full[name] = assemble([g.cpu() for g in gathered], case.layout)
    if dist.get_rank() != 0:
        return None
    q, k, v = (full[n].double().requires_grad_() for n in ("q", "k", "v"))
    out = attention(q, k, v, case.pattern, backend="blockwise")
    out.backward(full["d_out"].double())
    expected = {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
    return _relative_errors(full, expected)


@contextmanager
def _phase(name: str) -> Iterator[None]:
    """Name this rank and ``name`` in a collective's error (gloo's own says neither)."""
    try:
        yield
    except RuntimeError as exc:
        if str(exc).startswith("ring attention:"):  # already names rank, peer and phase
            raise
        raise RuntimeError(f"rank {dist.get_rank()} failed during {name}: {gloo_reason(exc)}") from exc


def scheme_call(case: RingCase):
    """``attend(q, k, v) -> out``: the case's scheme over the world (a collective call for the
    hybrid, which builds its grid here)."""
    options = {"layout": case.layout, "timeout": case.timeout}
    if case.scheme == "ring":
        return lambda q, k, v: ring_attention(q, k, v, case.pattern, **options)
    if case.scheme == "ulysses":
        return lambda q, k, v: ulysses_attention(q, k, v, case.pattern, **options)
    grid = make_grid(case.ulysses_degree)
    return lambda q, k, v: hybrid_attention(q, k, v, case.pattern, ulysses_group=grid.ulysses_group,
                                            ring_group=grid.ring_group, **options)


def model_bytes(case: RingCase, rank: int, world: int) -> int:
    """What the cost model says this rank sends for the case."""
    shape = CallShape(case.batch, case.seq, case.heads, case.kv_heads, case.head_dim, case.head_dim,
                      torch.empty((), dtype=_DTYPES[case.dtype]).element_size())
    steps = ring_steps(case.pattern, case.layout, case.seq, world, case.ulysses_degree)
    return scheme_bytes(case.scheme, shape, world, ulysses_degree=case.ulysses_degree, rank=rank,
                        ring_steps=steps or None)


def _announce(case: RingCase, phase: str) -> None:
    """Tell the launcher which phase this rank is in (its progress display)."""
    _write_whole(phase_file(case.work_dir, dist.get_rank()), phase)


def run_rank(case: RingCase) -> dict:
    """Run the case on this rank of the initialised process group; rank 0 gets every report."""
    rank, world = dist.get_rank(), dist.get_world_size()
    _announce(case, "drawing shards")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    shards = _random_shard(case, rank, world, device)
    q, k, v = (shards[n] for n in ("q", "k", "v"))
    with _phase("building the grid"):
        attend = scheme_call(case)
    with _phase("the start barrier"):
        dist.barrier()
    with record_ring_stats() as stats, count_traffic() as traffic:
        _announce(case, "forward")
        start = time.perf_counter()
        out = attend(q, k, v)
        forward_s = time.perf_counter() - start
        _announce(case, "backward")
        out.backward(shards["d_out"])
        backward_s = time.perf_counter() - start - forward_s
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    report = RankReport(
        rank, _spans(shard_positions(case.seq, case.layout, rank, world)), forward_s, backward_s,
        stats.compute_s, stats.compute_cpu_s, stats.wait_s, stats.forward_steps, stats.computed_steps,
        traffic.bytes_sent, model_bytes(case, rank, world), peak,
    )
    _announce(case, "done" if not case.check else "checking")
    reports = [None] * world
    with _phase("gathering the reports"):
        dist.all_gather_object(reports, asdict(report))
    errors = None
    if case.check:
        results = {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
        with _phase("the check against single-process attention"):
            errors = _check_against_single_process(case, shards, results, world)
    return {"reports": reports, "errors": errors}


def _write_whole(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a scratch file and a rename, so that a reader never sees
    half of it: torchrun may kill this rank mid-write when another rank fails."""
    scratch = f"{path}.{os.getpid()}.tmp"
    with open(scratch, "w") as handle:
        handle.write(text)
    os.replace(scratch, path)


def run_worker(case: RingCase) -> int:
    """This torchrun worker's whole job: join the group, run the case, and on rank 0 write the
    result to ``case.work_dir``. On failure write this rank's one-line error there and leave at
    once with exit code 2."""
    rank = int(os.environ.get("RANK", 0))
    try:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=case.timeout))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
        result = run_rank(case)
        if rank == 0:
            _write_whole(os.path.join(case.work_dir, RESULT_FILE), json.dumps(result))
        with _phase("the final barrier"):
            dist.barrier()
        dist.destroy_process_group()
        return 0
    except Exception as exc:  # the launcher turns this file into its one-line error
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        _write_whole(os.path.join(case.work_dir, f"rank{rank}.txt"),
                     f"{type(exc).__name__}\n{first_line}\n{time.time()!r}")
        print(f"attnkit ring: rank {rank}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        # Leave now: a gloo collective that failed on a dead or silent peer may still hold its
        # worker thread until the group's timeout, and a normal exit (or destroy_process_group)
        # would wait for it. Everything worth keeping is written and flushed.
        sys.stdout.flush()
        os._exit(2)
