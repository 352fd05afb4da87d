"""Attention sinks across 4 gloo ranks (ring, Ulysses, a 2 x 2 hybrid grid): the sink joins each
row's LSE once, after the partial results are merged, and its gradient summed over the ranks
equals single-process float64 attention's."""

from __future__ import annotations

import pytest
import torch

from attnkit import Causal, SlidingWindow, attention
from attnkit.distributed import (
    assemble,
    hybrid_attention,
    make_grid,
    ring_attention,
    sequence_parallel,
    shard,
    ulysses_attention,
)
from attnkit.distributed.launch import run_group
from attnkit.nn import MultiHeadAttention
from attnkit.patterns import Strided

WORLD, N = 4, 32
CASES = {
    "causal-zigzag": (Causal(), "zigzag"),
    "window-union-contiguous": (SlidingWindow(3) | Strided(5), "contiguous"),
}


def _problem(name):
    g = torch.Generator().manual_seed(sorted(CASES).index(name))
    q = torch.randn(2, 4, N, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, N, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, N, 6, generator=g, dtype=torch.float64)
    d_out = torch.randn(2, 4, N, 6, generator=g, dtype=torch.float64)
    d_lse = torch.randn(2, 4, N, generator=g, dtype=torch.float64)
    sinks = torch.randn(4, generator=g, dtype=torch.float64) * 3
    return q, k, v, d_out, d_lse, sinks


def _run(call, name):
    pattern, layout = CASES[name]
    q, k, v, d_out, d_lse, sinks = _problem(name)
    q, k, v, d_out, d_lse = (shard(t, layout) for t in (q, k, v, d_out, d_lse))
    q, k, v, sinks = (t.requires_grad_() for t in (q, k, v, sinks))
    out, lse = call(q, k, v, pattern, layout=layout, return_lse=True, timeout=60, sinks=sinks)
    ((out * d_out).sum() + (lse * d_lse).sum()).backward()
    torch.distributed.all_reduce(sinks.grad)  # a parameter shared by the ranks: its gradient sums
    return {"out": out.detach(), "lse": lse.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad, "dsinks": sinks.grad}


def _run_cases(rank, world):
    grid = make_grid(2)

    def hybrid(*args, **kwargs):
        return hybrid_attention(*args, ulysses_group=grid.ulysses_group, ring_group=grid.ring_group, **kwargs)

    calls = {"ring": ring_attention, "ulysses": ulysses_attention, "hybrid": hybrid}
    results = {(scheme, name): _run(call, name) for scheme, call in calls.items() for name in CASES}
    layer, x = _layer_problem()
    for scheme in ("ring", "ulysses", "hybrid"):
        layer.zero_grad()
        sharded = sequence_parallel(layer, scheme, grid, layout="zigzag", timeout=60)
        out = sharded(shard(x, "zigzag", dim=1))
        out.square().sum().backward()
        torch.distributed.all_reduce(layer.sinks.grad)
        results["layer", scheme] = {"out": out.detach(), "dsinks": layer.sinks.grad.clone()}
    return results


def _layer_problem():
    torch.manual_seed(5)
    layer = MultiHeadAttention(24, 4, 2, pattern=SlidingWindow(5), sinks=True).double()
    with torch.no_grad():
        layer.sinks.normal_(0.0, 3.0)
    return layer, torch.randn(2, N, 24, dtype=torch.float64)


@pytest.fixture(scope="module")
def ranks():
    results = run_group(_run_cases, WORLD, deadline_s=150, group_timeout_s=90)
    failed = [f"rank {r.rank}: {r.error}" for r in results if not r.ok]
    assert not failed, failed
    return [r.value for r in results]


def _expected(name):
    pattern = CASES[name][0]
    q, k, v, d_out, d_lse, sinks = _problem(name)
    q, k, v, sinks = (t.requires_grad_() for t in (q, k, v, sinks))
    out, lse = attention(q, k, v, pattern, backend="reference", return_lse=True, sinks=sinks)
    ((out * d_out).sum() + (lse * d_lse).sum()).backward()
    return {"out": out, "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad, "dsinks": sinks.grad}


@pytest.mark.parametrize("scheme", ["ring", "ulysses", "hybrid"])
@pytest.mark.parametrize("name", CASES)
def test_sinks_across_ranks_equal_single_process_attention(ranks, scheme, name):
    layout = CASES[name][1]
    for key, want in _expected(name).items():
        parts = [value[scheme, name][key] for value in ranks]
        got = parts[0] if key == "dsinks" else assemble(parts, layout)
        torch.testing.assert_close(got, want.detach(), atol=1e-9, rtol=1e-9,
                                   msg=lambda m, key=key: f"{scheme} {name} {key}: {m}")


@pytest.mark.parametrize("scheme", ["ring", "ulysses", "hybrid"])
def test_a_layer_with_sinks_sharded_by_each_scheme_equals_the_unsharded_layer(ranks, scheme):
    layer, x = _layer_problem()
    out = layer(x)
    out.square().sum().backward()
    got = assemble([value["layer", scheme]["out"] for value in ranks], "zigzag", dim=1)
    torch.testing.assert_close(got, out.detach(), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(ranks[0]["layer", scheme]["dsinks"], layer.sinks.grad, atol=1e-9, rtol=1e-9)
