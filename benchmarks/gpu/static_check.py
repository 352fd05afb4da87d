"""What ptxas says about every Triton kernel configuration attnkit's launcher can choose, for an
H100/H200 (sm_90a), without a GPU.

Runs the launcher (``attnkit.kernels.triton_launch``, forward and backward) on CPU tensors of the
benchmark's shapes, plain and with each score modification (softcap, alibi, distance_bias: their
own tile lists and kernels), with Triton's launch replaced by a recorder, so each kernel is specialised
exactly as a real launch would be (``tt.divisibility=16`` on pointers and strides, integers equal
to 1 folded in, the constexprs the launcher picks). Each recorded launch, and every candidate of
an autotuned kernel, is compiled by Triton for ``GPUTarget("cuda", 90, 32)`` into a fresh
``TRITON_CACHE_DIR``; the PTX then goes through the ``ptxas`` Triton itself uses for sm_90
(bundled in the wheel) with ``-v``. The table: kernel, case, config, registers, spill bytes
(stores + loads), shared memory, warnings (C7515/C7512: wgmma serialised).

Acceptance (exit status 1 when broken): for float16 and bfloat16 at D in {64, 128}, no
serialised-wgmma notice (C7515 or C7512) and no spill; shared memory within 227 KiB per block
everywhere. Configurations above 99 KiB (they cannot run on sm_86/sm_89) are marked ``>99K``.

    PYTHONPATH=src python benchmarks/gpu/static_check.py [--json OUT.json] [--cases window,strided]
        [--dtypes bf16,fp16,fp32] [--dims 64,128,256] [--forward-only] [--kernels _band_fwd,...] [--limit N]
        [--extra _band_fwd=64,128,8,3]   (also a configuration the launcher does not offer)
        [--sample]   (one launch per kernel family) [--resume] (with --json: keep its rows, compile the rest)
        [--score-mods none,softcap,alibi,distance_bias]   (every case with each score modification;
                                                    default all four: plain and modified kernels)
        [--list]   (record and list the launches only: seconds, no compile)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional

if __name__ == "__main__":  # before Triton is imported: it reads TRITON_INTERPRET then (imported, nothing changes)
    os.environ["TRITON_INTERPRET"] = "0"  # compile for real, even when the caller interprets
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="attnkit-static-"))  # fresh: nothing reused
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton's own ptxas -v log: no second ptxas run per kernel

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from attnkit.bench.documents import document_lengths  # noqa: E402
from attnkit.bench.sparse_cases import bigbird_layout  # noqa: E402
from attnkit.kernels import triton_launch  # noqa: E402
from attnkit.kernels.score_mods import alibi, distance_bias, softcap  # noqa: E402
from attnkit.patterns import BlockSparse, Causal, Document, Fixed, SlidingWindow, Strided  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = 232448  # bytes per block on sm_90 (227 KiB)
SMALL_SHARED = 101376  # sm_86 / sm_89 (99 KiB)
H100_SMS = 132  # streaming multiprocessors of an H100 SXM: the decode split counts depend on it
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SCORE_MODS = ("none", "softcap", "alibi", "distance_bias")  # in the order of the kernels' MOD codes (triton_mods)


@dataclass(frozen=True)
class Case:
    """One call of the launcher: what the benchmark (or a decode step) runs."""

    name: str
    pattern: Callable[[int], object]
    n_q: int
    n_k: int
    heads: tuple[int, int] = (16, 16)
    batch: int = 2
    backward: bool = True
    score_mod: str = ""  # "", "softcap", "alibi" or "distance_bias" (--score-mods)

    @property
    def label(self) -> str:
        """The case's name, with its score modification (``window+softcap``)."""
        return f"{self.name}+{self.score_mod}" if self.score_mod else self.name


CASES = (
    Case("window", lambda n: SlidingWindow(256), 8192, 8192),
    Case("window-noncausal", lambda n: SlidingWindow(256, causal=False), 8192, 8192),
    Case("causal", lambda n: Causal(), 8192, 8192),
    Case("strided", lambda n: Strided(128), 16384, 16384),
    Case("fixed", lambda n: Fixed(128, 8), 16384, 16384),
    Case("blocksparse", lambda n: BlockSparse(bigbird_layout(-(-n // 128)), 128), 8192, 8192),
    Case("union", lambda n: SlidingWindow(64) | Strided(100), 4096, 4096),
    Case("documents", lambda n: Causal() & Document(document_lengths(n)), 32768, 32768, batch=1),
    Case("decode-mha", lambda n: SlidingWindow(4096), 1, 32768, backward=False),
    Case("decode-gqa", lambda n: SlidingWindow(4096), 1, 32768, heads=(16, 2), backward=False),
    Case("decode-strided", lambda n: Strided(128), 1, 16384, heads=(16, 2), backward=False),
)


@dataclass
class Launch:
    """One kernel specialisation to compile: the kernel, its bound arguments and options."""

    fn: JITFunction
    args: tuple
    kwargs: dict
    cases: list[str] = field(default_factory=list)
    candidate: bool | str = False  # an autotune candidate (not necessarily the one a GPU would pick), or "extra"


@dataclass(frozen=True)
class _Pointer:
    """What specialisation reads of a tensor argument (its dtype and address), without its memory."""

    dtype: torch.dtype
    address: int

    def data_ptr(self) -> int:
        return self.address


def _light(args: tuple) -> tuple:
    return tuple(_Pointer(a.dtype, a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args)


class _Recorder:
    """Stands in for Triton's launch: collects what would have been launched. ``extra`` maps a
    kernel name to configurations ``(BM, BN, warps, stages)`` compiled beside its candidates (a
    configuration the launcher does not offer, such as FlexAttention's)."""

    def __init__(self, extra: Optional[dict[str, list[tuple[int, int, int, int]]]] = None) -> None:
        self.launches: list[tuple[JITFunction, tuple, dict, bool]] = []
        self.extra = extra or {}

    def jit_run(self, fn: JITFunction, *args, grid, warmup, **kwargs):
        self.launches.append((fn, _light(args), kwargs, False))

    def autotuned_run(self, tuner: Autotuner, *args, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        configs = tuner.configs
        if tuner.early_config_prune:  # the candidates for this call (row width, shared memory)
            configs = tuner.early_config_prune(configs, dict(zip(tuner.arg_names, args)), **kwargs)
        for config in configs:  # every candidate, whatever the tuner would pick on a GPU
            self.launches.append((tuner.fn, _light(args), {**kwargs, **config.all_kwargs()}, len(configs) > 1))
        for bm, bn, warps, stages in self.extra.get(tuner.fn.__name__, ()):
            tiles = {"BM": bm, "BN": bn, "num_warps": warps, "num_stages": stages}
            self.launches.append((tuner.fn, _light(args), {**kwargs, **tiles}, "extra"))


def record(cases, dtypes, dims, extra: Optional[dict] = None) -> list[Launch]:
    """Run the launcher on every case; returns the distinct launches with the cases that reach them
    (and the ``extra`` configurations of :class:`_Recorder`)."""
    recorder = _Recorder(extra)
    saved = JITFunction.run, Autotuner.run, triton_launch.triton_available, triton_launch._multiprocessors
    JITFunction.run = lambda self, *a, **k: recorder.jit_run(self, *a, **k)
    Autotuner.run = lambda self, *a, **k: recorder.autotuned_run(self, *a, **k)
    triton_launch.triton_available = lambda device=None: None  # CPU tensors stand in for CUDA ones
    triton_launch._multiprocessors = lambda device: H100_SMS  # decode splits as on an H100
    found: dict[str, Launch] = {}
    try:
        for case in cases:
            for dtype_name in dtypes:
                for dim in dims:
                    recorder.launches.clear()
                    _run_case(case, DTYPES[dtype_name], dim)
                    label = f"{case.label} {dtype_name} D={dim}"
                    for fn, args, kwargs, candidate in recorder.launches:
                        key = _key(fn, args, kwargs)
                        launch = found.setdefault(key, Launch(fn, args, kwargs, candidate=candidate))
                        if label not in launch.cases:
                            launch.cases.append(label)
    finally:
        JITFunction.run, Autotuner.run, triton_launch.triton_available, triton_launch._multiprocessors = saved
    return list(found.values())


def _run_case(case: Case, dtype: torch.dtype, dim: int) -> None:
    hq, hkv = case.heads
    # Uninitialised: nothing computes (the launches are recorded), so the pages are never touched.
    q = torch.empty(case.batch, hq, case.n_q, dim, dtype=dtype, requires_grad=case.backward)
    k = torch.empty(case.batch, hkv, case.n_k, dim, dtype=dtype, requires_grad=case.backward)
    v = torch.empty(case.batch, hkv, case.n_k, dim, dtype=dtype, requires_grad=case.backward)
    score_mod = {"": lambda: None, "softcap": lambda: softcap(30.0), "alibi": lambda: alibi(torch.ones(hq)),
                 "distance_bias": lambda: distance_bias(torch.zeros(hq, 128))}[case.score_mod]()
    out, lse = triton_launch.triton_kernel(q, k, v, case.pattern(case.n_k), dim ** -0.5, score_mod)
    if case.backward:
        torch.autograd.backward((out, lse), (torch.empty_like(out), torch.empty_like(lse)))


def _bind(fn: JITFunction, args: tuple, kwargs: dict):
    """``(signature, constexprs, attrs, options)`` exactly as ``JITFunction.run`` derives them."""
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options


def _key(fn: JITFunction, args: tuple, kwargs: dict) -> str:
    """A short name of the specialisation and of the kernel's source (``cache_key`` covers the
    functions it calls): the same key, the same compiled code."""
    signature, constexprs, attrs, options = _bind(fn, args, kwargs)
    spec = repr((fn.__name__, fn.cache_key, signature, sorted(constexprs.items()), sorted(attrs.items()), options))
    return hashlib.sha256(spec.encode()).hexdigest()[:20]


def _family(launch: Launch) -> tuple:
    """The kernel, the flags that make a different kernel body of it (decode's packed heads, a part
    merging into the previous parts' result, the score modification), its dtype and head dim:
    ``--sample`` compiles one launch of each."""
    dtype = next((a.dtype for a in launch.args if isinstance(a, _Pointer)), None)
    return (launch.fn.__name__, launch.kwargs.get("PACKED"), launch.kwargs.get("MERGE"), launch.kwargs.get("MOD"),
            dtype, launch.kwargs.get("D"))


def _config(fn: JITFunction, kwargs: dict) -> str:
    shown = {k: v for k, v in kwargs.items() if k in fn.arg_names and k not in ("D", "DV", "BD", "BDV")
             and not isinstance(v, (torch.Tensor, _Pointer)) and v is not None}  # score-mod buffers, unused ones
    parts = [f"{k}={v}" for k, v in shown.items()]
    return " ".join(parts + [f"w{kwargs.get('num_warps', 4)}", f"s{kwargs.get('num_stages', 3)}"])


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_NOTICE = re.compile(r"warning|\(C\d{4}\)")  # ptxas reports C7515 (wgmma serialised) as "info"


def _message(line: str) -> str:
    """A ptxas notice without its tool prefix and the PTX line number (same notice, same text)."""
    text = re.sub(r"^\S+ (info|warning)\s*: ", "", line.strip())
    return re.sub(r" in line \d+$", "", text)


def compile_one(launch: Launch) -> dict:
    """Compile for sm_90a and run ptxas -v on the PTX: one table row."""
    signature, constexprs, attrs, options = _bind(launch.fn, launch.args, launch.kwargs)
    dtype = signature.get("Q", "?").lstrip("*")
    dims = [v for (i,), v in constexprs.items() if launch.fn.arg_names[i] == "D"]
    row = {"kernel": launch.fn.__name__, "key": _key(launch.fn, launch.args, launch.kwargs),
           "dtype": dtype, "D": dims[0] if dims else None,
           "config": _config(launch.fn, launch.kwargs), "cases": launch.cases, "candidate": launch.candidate}
    start = time.monotonic()
    printed = io.StringIO()  # Triton runs ptxas -v itself (the flags below) and prints its log when asked
    try:
        with contextlib.redirect_stdout(printed):
            compiled = triton.compile(ASTSource(launch.fn, signature, constexprs, attrs), target=TARGET,
                                      options=options.__dict__)
    except Exception as exc:  # report every configuration, not only the first failure
        return {**row, "error": f"{type(exc).__name__}: {str(exc)[:1500]}"}
    row["shared"] = compiled.metadata.shared
    log = printed.getvalue()
    if not _PTXAS_USED.search(log):  # not from Triton (a cached kernel, or a Triton that prints nothing)
        with tempfile.TemporaryDirectory() as scratch:
            ptx = os.path.join(scratch, "kernel.ptx")
            with open(ptx, "w") as f:
                f.write(compiled.asm["ptx"])
            result = subprocess.run([get_ptxas(TARGET.arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                                     "--gpu-name=sm_90a", ptx, "-o", os.path.join(scratch, "kernel.cubin")],
                                    capture_output=True, text=True)
        log = result.stdout + result.stderr
    used, spill = _PTXAS_USED.search(log), _PTXAS_SPILL.search(log)
    row["registers"] = int(used.group(1)) if used else None
    row["spills"] = int(spill.group(1)) + int(spill.group(2)) if spill else None
    row["warnings"] = sorted({_message(line) for line in log.splitlines() if _NOTICE.search(line)})
    row["seconds"] = round(time.monotonic() - start, 1)
    return row


_LAUNCHES: list[Launch] = []


def _compile_nth(number: int) -> dict:
    return compile_one(_LAUNCHES[number])


def _compile_all(launches: list[Launch], jobs: int, path: Optional[str], resume: bool) -> list[dict]:
    """Compile the launches ``jobs`` at a time under a progress bar, rewriting ``path`` after each
    (a run cut short keeps what it compiled). ``resume``: rows already in ``path`` with the same
    specialisation are kept, not recompiled (their cases updated), so a long sweep runs in parts."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    done = {}
    if resume and path and os.path.exists(path):
        done = {row["key"]: row for row in json.load(open(path)) if "key" in row and "error" not in row}
    rows, todo = [], []
    for launch in launches:
        key = _key(launch.fn, launch.args, launch.kwargs)
        if key in done:
            rows.append({**done[key], "cases": launch.cases, "candidate": launch.candidate})
        else:
            todo.append(launch)
    _LAUNCHES[:] = todo  # the workers (forked) find them here
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns) as progress, \
            ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        task = progress.add_task(f"sm_90a compiles ({len(rows)} kept)", total=len(todo))
        for row in pool.map(_compile_nth, range(len(todo))):
            rows.append(row)
            progress.console.print(f"{row['kernel']} {row['dtype']} D={row['D']} {row['config']}: "
                                   f"{row.get('registers')} regs, {row.get('spills')} spill bytes, shared "
                                   f"{row.get('shared')}, {row.get('warnings') or row.get('error') or ''}")
            progress.advance(task)
            if path:
                with open(path, "w") as f:
                    json.dump(rows, f, indent=1)
    return rows


def problems(row: dict) -> list[str]:
    """Why a row breaks the acceptance (empty when it does not)."""
    if "error" in row:
        return ["does not compile"]
    found = []
    if row["shared"] > SHARED_LIMIT:
        found.append(f"shared {row['shared']} > {SHARED_LIMIT}")
    if row["dtype"] in ("bf16", "fp16") and row["D"] in (64, 128):
        if row["spills"]:
            found.append(f"{row['spills']} spill bytes")
        for code in sorted({_code(w) for w in row["warnings"] if "serialized" in w}):
            found.append(f"wgmma serialised ({code})")
    return found


def _code(notice: str) -> str:
    """A ptxas notice's code (``C7515``, ``C7512``, ...)."""
    found = re.search(r"\((C\d{4})\)", notice)
    return found.group(1) if found else "?"


def _short(notice: str) -> str:
    return f"{_code(notice)} wgmma serialised" if "serialized" in notice else notice[:80]


def _print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Triton kernels for sm_90a (ptxas -v)")
    for column in ("kernel", "dtype", "D", "config", "regs", "spills", "shared", "warnings", "cases"):
        table.add_column(column, overflow="fold")
    for row in rows:
        if "error" in row:
            table.add_row(row["kernel"], row["dtype"], str(row["D"]), row["config"], "", "", "",
                          "[red]" + row["error"][:200], ", ".join(row["cases"]))
            continue
        shared = f"{row['shared'] / 1024:.0f}K" + (" >99K" if row["shared"] > SMALL_SHARED else "")
        bad = problems(row)
        style = "[red]" if bad else ""
        marks = {True: " (candidate)", "extra": " (extra)"}
        table.add_row(row["kernel"], row["dtype"], str(row["D"]), row["config"] + marks.get(row["candidate"], ""),
                      str(row["registers"]), style + str(row["spills"]), shared,
                      style + "; ".join(map(_short, row["warnings"])), ", ".join(row["cases"]))
    Console(width=220).print(table)


def _list(launches: list[Launch], path: Optional[str]) -> int:
    """Print (and write) the recorded launches: kernel, specialisation, config, the cases reaching them."""
    rows = []
    for launch in launches:
        _, _, attrs, _ = _bind(launch.fn, launch.args, launch.kwargs)
        divisible = sorted(launch.fn.arg_names[i] for (i,), values in attrs.items() if ["tt.divisibility", 16] in values)
        rows.append({"kernel": launch.fn.__name__, "key": _key(launch.fn, launch.args, launch.kwargs),
                     "config": _config(launch.fn, launch.kwargs),
                     "divisible_by_16": divisible, "candidate": launch.candidate, "cases": launch.cases})
        print(f"{rows[-1]['kernel']} {rows[-1]['config']}: {', '.join(launch.cases)}")
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"{len(rows)} kernel configurations")
    return 0 if rows else 1


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--cases", default=",".join(c.name for c in CASES), help="comma-separated case names")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32")
    parser.add_argument("--dims", default="64,128,256")
    parser.add_argument("--forward-only", action="store_true")
    parser.add_argument("--kernels", help="comma-separated kernel names (e.g. _band_fwd): compile only these")
    parser.add_argument("--limit", type=int, default=0, help="compile at most this many launches (a quick check)")
    parser.add_argument("--sample", action="store_true",
                        help="one launch per kernel family (kernel, decode, merging part): a quick check")
    parser.add_argument("--list", action="store_true", help="record and list the launches, compile nothing")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compiles at once")
    parser.add_argument("--extra", action="append", default=[], metavar="KERNEL=BM,BN,WARPS,STAGES",
                        help="also compile this configuration of a tiled kernel (not a candidate of the "
                             "launcher), e.g. FlexAttention's _band_fwd=64,128,8,3; repeatable")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in --json (same specialisation), compile the rest")
    parser.add_argument("--only-extra", action="store_true", help="compile the --extra configurations only")
    parser.add_argument("--score-mods", default=",".join(SCORE_MODS),
                        help="comma-separated: every case with each of these score modifications ('none': "
                             "the plain kernels; distance_bias: a table of 128 columns); default all")
    args = parser.parse_args(argv)
    extra: dict[str, list[tuple[int, ...]]] = {}
    for item in args.extra:
        name, _, tiles = item.partition("=")
        try:
            extra.setdefault(name, []).append(tuple(int(x) for x in tiles.split(",")))
        except ValueError:
            parser.error(f"--extra: expected KERNEL=BM,BN,WARPS,STAGES, got {item!r}")
        if len(extra[name][-1]) != 4:
            parser.error(f"--extra: expected four numbers after {name}=, got {tiles!r}")
    wanted = args.cases.split(",")
    unknown = set(wanted) - {c.name for c in CASES}
    if unknown:
        parser.error(f"--cases: unknown {sorted(unknown)}; known: {[c.name for c in CASES]}")
    mods = args.score_mods.split(",")
    if set(mods) - set(SCORE_MODS):
        parser.error(f"--score-mods: unknown {sorted(set(mods) - set(SCORE_MODS))}; known: {list(SCORE_MODS)}")
    cases = [Case(**{**c.__dict__, "score_mod": "" if mod == "none" else mod,
                     "backward": c.backward and not args.forward_only})
             for c in CASES if c.name in wanted for mod in mods]
    launches = record(cases, args.dtypes.split(","), [int(d) for d in args.dims.split(",")], extra)
    if args.only_extra:
        launches = [launch for launch in launches if launch.candidate == "extra"]
    if args.kernels:
        launches = [launch for launch in launches if launch.fn.__name__ in args.kernels.split(",")]
    if args.sample:
        launches = list({_family(launch): launch for launch in reversed(launches)}.values())[::-1]
    if args.limit:
        launches = launches[: args.limit]
    if args.list:
        return _list(launches, args.json)
    rows = _compile_all(launches, args.jobs, args.json, args.resume)
    _print_table(rows)
    broken = [(row, problems(row)) for row in rows if problems(row) and row["candidate"] != "extra"]
    for row, why in broken:
        print(f"FAIL {row['kernel']} {row['dtype']} D={row['D']} {row['config']}: {'; '.join(why)}")
    print(f"{len(rows)} kernel configurations, {len(broken)} break the acceptance")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
