"""Whole-model generation speed of attnkit against llama.cpp on the same GGUF file.

Each contender runs in its own process (:mod:`attnkit.bench.decode_worker`), loaded once; the
runs interleave (one run of each contender per round, the order rotating from round to round)
so load from other processes hits all alike. Every run gets the same prompt token ids
(``prompt_tokens`` of them, cut from standard-library docstrings, the file's tokenizer) and
decodes ``new_tokens`` greedily with no stop token, at the same thread count. Reported per
contender: medians of prefill tokens/s (prompt tokens / time to the first new token) and decode
tokens/s (``new_tokens - 1`` / time from the first new token to the last), the load time, the
first run (warm-up, and compilation where a contender compiles) apart from the timed ones, and
the peak resident memory above the process's own baseline (its memory after importing its
libraries, before loading the model).

With ``busy`` > 0, that many extra processes spin on the CPU for the whole run (a core taken
by another program, as on a shared machine), so contenders are compared under contention.

llama.cpp is the ``xllamacpp`` package (the ``llamacpp`` extra); without it only attnkit runs,
with a note. ``attnkit bench --case decode --model FILE`` and ``benchmarks/llama_cpp_peer.py``
both run :func:`run_decode_peers`.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import statistics
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

PROMPT_SOURCES = ("textwrap", "argparse", "json", "csv", "heapq", "bisect", "contextlib", "functools")
"""Standard-library modules whose docstrings make the prompt text: plain English, no download."""


@dataclass
class Contender:
    """One process of the benchmark: ``name`` in the table, ``kind`` the worker
    (``attnkit`` or ``llama.cpp``) and its extra worker options (``--dtype bf16``, ``--int8``)."""

    name: str
    kind: str
    options: tuple[str, ...] = ()


@dataclass
class Result:
    """Medians of one contender; ``runs`` holds every timed run's ``(prefill_s, decode_s)``."""

    name: str
    prefill_tok_s: float
    decode_tok_s: float
    load_s: float
    warmup_s: float
    peak_mib: float
    tokens: list[int]
    runs: list[tuple[float, float]] = field(default_factory=list)


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("xllamacpp") is not None


def llama_cpp_version() -> Optional[str]:
    """The ``xllamacpp`` version, or None when it is not installed."""
    if not llama_cpp_available():
        return None
    from importlib.metadata import version

    return version("xllamacpp")


def prompt_ids(model: Path, n_tokens: int) -> list[int]:
    """``n_tokens`` token ids of standard-library docstrings, tokenized by the file's tokenizer."""
    from ..models.tokenizer import load_text_tokenizer

    tokenizer = load_text_tokenizer(model)
    text = "\n\n".join(inspect.getdoc(importlib.import_module(name)) or "" for name in PROMPT_SOURCES)
    ids = tokenizer.encode(text)
    if len(ids) < n_tokens:
        raise ValueError(f"prompt_tokens: at most {len(ids)} tokens of prompt text are available, got {n_tokens}")
    return ids[:n_tokens]


class _Worker:
    """A contender's process: requests on its stdin, answers on its stdout, its log in a file."""

    def __init__(self, contender: Contender, model: Path, threads: int, context: int, log: Path) -> None:
        command = [sys.executable, "-m", "attnkit.bench.decode_worker", contender.kind, "--model", str(model),
                   "--threads", str(threads), "--context", str(context), *contender.options]
        self.log = log
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=log.open("w"), text=True)
        self.ready = self._answer()

    def _answer(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            tail = self.log.read_text().strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"decode worker exited with code {self.process.returncode}: {tail[0]} (log: {self.log})")
        return json.loads(line)

    def run(self, ids: list[int], new: int) -> dict:
        self.process.stdin.write(json.dumps({"ids": ids, "new": new}) + "\n")
        self.process.stdin.flush()
        return self._answer()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


BUSY_LOOP = "while True: pass"
"""What each ``busy`` process runs: one core kept fully busy, no memory traffic to speak of."""


@contextmanager
def busy_processes(count: int):
    """``count`` processes spinning on the CPU for the duration of the ``with`` block (killed at its
    end, also on an error); yields their :class:`subprocess.Popen` objects. ValueError for a
    negative count."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"busy must be a non-negative int, got {count!r}")
    spinners = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(count)]
    try:
        yield spinners
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def _interleaved_runs(model: Path, contenders: list[Contender], workers: list[_Worker], threads: int,
                      context: int, ids: list[int], new_tokens: int, repeats: int, log_dir: Path,
                      on_step: Callable[[str], None]) -> list[list[dict]]:
    """Load each contender's worker (appended to ``workers``), then run them round by round, the
    order rotating; each worker's answers, warm-up first. The workers are closed at the end."""
    try:
        for contender in contenders:
            on_step(f"loading {contender.name}")
            workers.append(_Worker(contender, model, threads, context, log_dir / f"{contender.name.replace(' ', '_')}.log"))
        answers: list[list[dict]] = [[] for _ in contenders]
        for round_ in range(1 + repeats):
            order = list(range(len(contenders)))
            order = order[round_ % len(order):] + order[: round_ % len(order)]
            for i in order:
                on_step(f"{contenders[i].name}: {'warm-up' if round_ == 0 else f'run {round_}/{repeats}'}")
                answers[i].append(workers[i].run(ids, new_tokens))
    finally:
        for worker in workers:
            worker.close()
    return answers


def run_decode_peers(
    model: Path,
    contenders: list[Contender],
    *,
    threads: int,
    prompt_tokens: int = 512,
    new_tokens: int = 128,
    repeats: int = 3,
    busy: int = 0,
    log_dir: Path,
    on_step: Callable[[str], None] = lambda description: None,
) -> list[Result]:
    """Run every contender ``1 + repeats`` times (the first is the warm-up), interleaved; return
    one :class:`Result` per contender. ``log_dir`` receives each worker's stderr. ``busy``
    processes spin on the CPU from before the first model loads until the last run ends
    (:func:`busy_processes`).

    Raises ValueError for a bad count and RuntimeError when a worker fails (naming its log).
    """
    for name, value in (("threads", threads), ("prompt_tokens", prompt_tokens), ("repeats", repeats)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be at least 2 (the decode is timed after the first), got {new_tokens}")
    ids = prompt_ids(model, prompt_tokens)
    context = prompt_tokens + new_tokens
    workers = []
    with busy_processes(busy):
        answers = _interleaved_runs(model, contenders, workers, threads, context, ids, new_tokens, repeats,
                                    log_dir, on_step)
    results = []
    for contender, worker, runs in zip(contenders, workers, answers):
        warmup, timed = runs[0], runs[1:]
        results.append(Result(
            name=contender.name,
            prefill_tok_s=prompt_tokens / statistics.median(r["prefill_s"] for r in timed),
            decode_tok_s=(new_tokens - 1) / statistics.median(r["decode_s"] for r in timed),
            load_s=worker.ready["load_s"],
            warmup_s=warmup["prefill_s"] + warmup["decode_s"],
            peak_mib=max(r["peak_mib"] for r in runs),
            tokens=timed[-1]["tokens"],
            runs=[(r["prefill_s"], r["decode_s"]) for r in timed],
        ))
    return results


def default_contenders(with_llama_cpp: bool, variants: tuple[str, ...] = ()) -> list[Contender]:
    """llama.cpp (when asked and installed), attnkit with ``attnkit generate``'s defaults, and one
    attnkit contender per extra variant (``bf16``, ``int8``)."""
    contenders = []
    if with_llama_cpp:
        contenders.append(Contender(f"llama.cpp {llama_cpp_version()}", "llama.cpp"))
    contenders.append(Contender("attnkit (defaults)", "attnkit"))
    extra = {"bf16": ("--dtype", "bf16"), "fp32": ("--dtype", "fp32"), "int8": ("--dtype", "bf16", "--int8"),
             "no-pack": ("--no-pack",), "compile": ("--compile",), "x-float32": ("--activations", "float32"),
             "x-int8": ("--activations", "int8"), "torch-step": ("--no-native-step",)}
    for variant in variants:
        if variant not in extra:
            raise ValueError(f"variant must be one of {', '.join(extra)}, got {variant!r}")
        contenders.append(Contender(f"attnkit {variant}", "attnkit", extra[variant]))
    return contenders


def results_table(results: list[Result], title: str):
    """A rich table; ratios are against the first llama.cpp row when there is one."""
    from rich.table import Table

    peer = next((r for r in results if r.name.startswith("llama.cpp")), None)
    table = Table(title=title)
    for column in ("contender", "prefill tok/s", "decode tok/s", "decode ratio", "prefill ratio",
                   "peak MiB", "load s", "warm-up s"):
        table.add_column(column, justify="left" if column == "contender" else "right")
    for r in results:
        ratios = ("-", "-") if peer is None else (f"{r.decode_tok_s / peer.decode_tok_s:.2f}x",
                                                   f"{r.prefill_tok_s / peer.prefill_tok_s:.2f}x")
        table.add_row(r.name, f"{r.prefill_tok_s:.3g}", f"{r.decode_tok_s:.3g}", ratios[0], ratios[1],
                      f"{r.peak_mib:.0f}", f"{r.load_s:.1f}", f"{r.warmup_s:.1f}")
    return table


def results_json(results: list[Result], meta: dict) -> str:
    return json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=2)
