"""The ``document`` case of ``attnkit bench``: packed documents, ``Causal() & Document(lengths)``.

One row of ``N`` tokens in documents of 512-4096 tokens (seeded), ``B=1, H=8, D=64`` float32,
timed side by side in one process (medians):

- attnkit: ``attention(q, k, v, Causal() & Document(lengths))`` (``auto``: the sparse planner's
  document plan), forward and forward + backward; its plan for a new set of lengths
  (``Document(lengths)`` and :func:`~attnkit.kernels.sparse_plan.plan_documents`, uncached);
- torch SDPA with the dense boolean mask (``N x N``), forward and forward + backward; its "plan" is
  building that mask from the pattern;
- FlexAttention: ``torch.compile(flex_attention)`` (inference: no CPU backward in this torch) with
  attention-gym's document ``mask_mod`` (a document id per position); its plan is
  ``create_block_mask`` (compiled, warm), the step Flex users report as slow for document masks.

Peak memory is what one forward + backward (forward for Flex) adds to the process
(:func:`~attnkit.bench.memory.peak_memory_bytes`).
"""

from __future__ import annotations

import os
import random
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from rich.table import Table

from ..functional import attention
from ..kernels.sparse_plan import document_piece, plan_documents
from ..patterns import Causal, Document
from .memory import peak_memory_bytes
from .peers import FLEX_BLOCK, compiled_flex

SHORTEST, LONGEST = 512, 4096
DOCUMENT_SEQ = 32768


def document_lengths(n: int, shortest: int = SHORTEST, longest: int = LONGEST, seed: int = 0) -> list[int]:
    """Lengths drawn uniformly from ``[shortest, longest]`` (seeded) until they cover ``n``; the
    last is cut to fit."""
    draw, lengths = random.Random(seed), []
    while sum(lengths) < n:
        lengths.append(draw.randint(shortest, longest))
    lengths[-1] -= sum(lengths) - n
    return lengths


@dataclass
class DocumentRow:
    """One contender's medians in milliseconds (None: not measured) and its peak memory."""

    contender: str
    forward_ms: Optional[float]
    forward_backward_ms: Optional[float]
    plan_ms: Optional[float]
    plan_step: str
    peak_mib: Optional[float]
    note: str = ""


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: compilation, plan caches, the native library
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _mib(fn: Callable[[], object]) -> Optional[float]:
    peak = peak_memory_bytes(fn, torch.device("cpu"))
    return None if peak is None else peak / 2**20


def _forward_backward(run: Callable, q, k, v) -> Callable[[], None]:
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]

    def step() -> None:
        out = run(*leaves)
        out.backward(torch.ones_like(out))
        for leaf in leaves:
            leaf.grad = None

    return step


def _attnkit_plan(lengths: list[int], n: int) -> None:
    plan_documents(document_piece(Causal() & Document(lengths)), n, n, cached=False)  # a new batch of lengths


def _flex_mask_mod(lengths: list[int]):
    document = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))

    def mask_mod(b, h, q_idx, kv_idx):  # attention-gym's document mask, causal
        return (document[q_idx] == document[kv_idx]) & (q_idx >= kv_idx)

    return mask_mod


def run_document_bench(
    n: int = DOCUMENT_SEQ, *, heads: int = 8, dim: int = 64, repeats: int = 3,
    on_step: Callable[[str], None] = lambda _: None,
) -> dict:
    """Time the three contenders on one packed row of ``n`` tokens; returns a JSON-ready dict with
    the rows, the acceptance ratios and the machine's load average before and after."""
    load_before = os.getloadavg()
    lengths = document_lengths(n)
    pattern = Causal() & Document(lengths)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, dim, generator=gen) for _ in range(3))
    rows = []

    def ours(q_, k_, v_):
        return attention(q_, k_, v_, pattern)

    on_step("attnkit: plan")
    plan_ms = _median_ms(lambda: _attnkit_plan(lengths, n), max(repeats, 7))
    on_step("attnkit: forward")
    with torch.no_grad():
        forward_ms = _median_ms(lambda: ours(q, k, v), repeats)
    on_step("attnkit: forward + backward")
    step = _forward_backward(ours, q, k, v)
    rows.append(DocumentRow("attnkit (auto)", forward_ms, _median_ms(step, repeats), plan_ms,
                            "Document + plan_documents", _mib(step)))

    on_step("FlexAttention: create_block_mask")
    from torch.nn.attention.flex_attention import create_block_mask  # lazy: only this case needs it

    def block_mask():
        return create_block_mask(_flex_mask_mod(lengths), None, None, n, n, device="cpu", BLOCK_SIZE=FLEX_BLOCK,
                                 _compile=True)

    mask_ms = _median_ms(block_mask, repeats)
    mask = block_mask()
    flex = compiled_flex()
    on_step("FlexAttention: forward (compiled)")
    with torch.no_grad():
        flex_ms = _median_ms(lambda: flex(q, k, v, block_mask=mask), repeats)
        flex_mib = _mib(lambda: flex(q, k, v, block_mask=mask))
    rows.append(DocumentRow("flex_attention (compiled)", flex_ms, None, mask_ms, "create_block_mask (compiled)",
                            flex_mib, "no CPU backward in this torch"))

    on_step("torch SDPA: dense mask")
    mask_dense_ms = _median_ms(lambda: pattern.mask(n, n), 1)
    dense = pattern.mask(n, n)

    def sdpa(q_, k_, v_):
        return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=dense)

    on_step("torch SDPA: forward")
    with torch.no_grad():
        sdpa_ms = _median_ms(lambda: sdpa(q, k, v), repeats)
    on_step("torch SDPA: forward + backward")
    step = _forward_backward(sdpa, q, k, v)
    rows.append(DocumentRow("torch sdpa (N x N bool mask)", sdpa_ms, _median_ms(step, repeats), mask_dense_ms,
                            "pattern.mask(N, N)", _mib(step)))
    del dense

    ours_row, flex_row, sdpa_row = rows
    ratios = {
        "forward_backward_vs_masked_sdpa": ours_row.forward_backward_ms / sdpa_row.forward_backward_ms,
        "forward_speedup_vs_compiled_flex": flex_row.forward_ms / ours_row.forward_ms,
        "plan_speedup_vs_create_block_mask": flex_row.plan_ms / ours_row.plan_ms,
    }
    return {
        "n": n, "heads": heads, "head_dim": dim, "documents": len(lengths), "lengths": lengths,
        "threads": torch.get_num_threads(), "repeats": repeats, "torch": torch.__version__,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "rows": [asdict(r) for r in rows], "ratios": ratios,
    }


def document_table(result: dict) -> Table:
    """The rows and the acceptance ratios of :func:`run_document_bench` as a rich table."""
    table = Table(title=(f"packed documents: Causal & Document, N={result['n']} in {result['documents']} documents "
                         f"of {SHORTEST}-{LONGEST}, H={result['heads']}, D={result['head_dim']}, "
                         f"{result['threads']} threads, median of {result['repeats']}"))
    for column in ("contender", "forward ms", "fwd+bwd ms", "plan ms", "plan step", "peak MiB", "note"):
        table.add_column(column, justify="left" if column in ("contender", "plan step", "note") else "right")
    cell = lambda value, spec: "" if value is None else format(value, spec)  # noqa: E731
    for row in result["rows"]:
        table.add_row(row["contender"], cell(row["forward_ms"], ".1f"), cell(row["forward_backward_ms"], ".1f"),
                      cell(row["plan_ms"], ".3f"), row["plan_step"], cell(row["peak_mib"], ".0f"), row["note"])
    ratios = result["ratios"]
    table.caption = (f"fwd+bwd / masked SDPA: {ratios['forward_backward_vs_masked_sdpa']:.3f}; forward vs compiled "
                     f"Flex: {ratios['forward_speedup_vs_compiled_flex']:.2f}x; plan vs create_block_mask: "
                     f"{ratios['plan_speedup_vs_create_block_mask']:.0f}x; load "
                     f"{result['load_average_before'][0]:.1f} -> {result['load_average_after'][0]:.1f}")
    return table


__all__ = ["DOCUMENT_SEQ", "DocumentRow", "document_lengths", "document_table", "run_document_bench"]
