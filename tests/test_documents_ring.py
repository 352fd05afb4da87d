"""Ring attention with packed documents of any lengths, on 4 spawned gloo ranks, against
single-process float64 attention (out, LSE, dq, dk, dv); the schedule skips steps with no pair."""

from __future__ import annotations

import random

import pytest
import torch

from attnkit import Causal, Document, SlidingWindow, attention
from attnkit.distributed import assemble, record_ring_stats, ring_attention, ring_schedule, shard
from attnkit.distributed.launch import run_group

N, WORLD, DEADLINE_S = 48, 4, 150


def _lengths(seed: int) -> list[int]:
    """Random lengths covering N, with an empty and a 1-token document, none aligned to a shard."""
    draw, lengths = random.Random(seed), [0, 1]
    while sum(lengths) < N:
        lengths.append(draw.randint(1, 17))
    lengths[-1] -= sum(lengths) - N
    draw.shuffle(lengths)
    return lengths


# name: (pattern, layout, q heads, kv heads)
CASES = {
    "document-zigzag": (Document(_lengths(0)), "zigzag", 4, 2),
    "causal-document-contiguous": (Causal() & Document(_lengths(1)), "contiguous", 2, 2),
    "causal-document-zigzag": (Causal() & Document(_lengths(2)), "zigzag", 4, 1),
    "window-document-striped": (SlidingWindow(5) & Document(_lengths(3)), "striped", 2, 2),
}


def _full_problem(name):
    _pattern, _layout, n_heads, n_kv_heads = CASES[name]
    g = torch.Generator().manual_seed(sorted(CASES).index(name))
    q = torch.randn(1, n_heads, N, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, n_kv_heads, N, 8, generator=g, dtype=torch.float64)
    v = torch.randn(1, n_kv_heads, N, 8, generator=g, dtype=torch.float64)
    d_out = torch.randn(1, n_heads, N, 8, generator=g, dtype=torch.float64)
    d_lse = torch.randn(1, n_heads, N, generator=g, dtype=torch.float64)
    return q, k, v, d_out, d_lse


def _run_cases(rank, world):
    results = {}
    for name, (pattern, layout, *_heads) in CASES.items():
        q, k, v, d_out, d_lse = (shard(t, layout) for t in _full_problem(name))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        with record_ring_stats() as stats:
            out, lse = ring_attention(q, k, v, pattern, layout=layout, return_lse=True, timeout=60)
            ((out * d_out).sum() + (torch.where(torch.isinf(lse), 0.0, lse) * d_lse).sum()).backward()
        results[name] = {"out": out, "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad,
                         "steps": stats.forward_steps}
    return results


@pytest.fixture(scope="module")
def ring_run():
    ranks = run_group(_run_cases, WORLD, deadline_s=DEADLINE_S, group_timeout_s=60)
    failed = [f"rank {r.rank}: {r.error}" for r in ranks if not r.ok]
    assert not failed, failed
    return [r.value for r in ranks]


@pytest.mark.parametrize("name", CASES)
def test_ring_with_documents_equals_float64_attention(ring_run, name):
    pattern, layout, *_heads = CASES[name]
    q, k, v, d_out, d_lse = _full_problem(name)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = attention(q, k, v, pattern, backend="reference", return_lse=True)
    ((out * d_out).sum() + (torch.where(torch.isinf(lse), 0.0, lse) * d_lse).sum()).backward()
    expected = {"out": out, "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}
    for key, reference in expected.items():
        got = assemble([value[name][key] for value in ring_run], layout)
        torch.testing.assert_close(got, reference, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name} {key}: {m}")
    assert ring_run[0][name]["steps"] == ring_schedule(pattern, layout, N, WORLD).steps


def test_the_schedule_skips_steps_with_no_pair_in_any_document():
    # Documents inside contiguous shards: every rank needs its own keys only.
    assert ring_schedule(Causal() & Document([12, 12, 12, 12]), "contiguous", N, WORLD).steps == 1
    # Documents cross from shard 0 into 1 and from 2 into 3 only: two steps, the second computed
    # by ranks 1 and 3 alone.
    schedule = ring_schedule(Causal() & Document([10, 14, 24]), "contiguous", N, WORLD)
    assert schedule.steps == 2 and [row[1] for row in schedule.needed] == [False, True, False, True]
    # Without causality a query sees its whole document: a document over every shard needs every step.
    assert ring_schedule(Document([1, 46, 1]), "contiguous", N, WORLD).steps == WORLD


@pytest.mark.slow
def test_a_ring_over_256k_tokens_of_documents_runs(tmp_path):
    """The long case of the acceptance (22 s on the quiet 2-core machine; its time and memory are in
    benchmarks/results/2026-12-07-documents.md): 262144 tokens in documents of 512-4096 tokens."""
    import json

    from attnkit.bench.documents import document_lengths
    from attnkit.cli import main

    n = 2**18
    lengths = ",".join(map(str, document_lengths(n)))
    argv = ["ring", "--nproc", "4", "--seq", str(n), "--heads", "2", "--head-dim", "64",
            "--pattern", f"causal-document:{lengths}", "--check", "no", "--timeout", "3000",
            "--json", str(tmp_path / "ring.json")]
    assert main(argv) == 0
    assert json.loads((tmp_path / "ring.json").read_text())
