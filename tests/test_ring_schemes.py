"""Ulysses and the Ulysses x ring hybrid on 2, 3 and 4 spawned gloo processes against float64 attention.

Every case compares out, LSE, dq, dk and dv (max error relative to the largest entry, 1e-6 in
float64, 1e-4 in float32) on the ring's shard layouts; the heads are chosen so that the degree
does not divide them (uneven shards) and, at 3 and 4 ranks, so that there are fewer KV heads
than ranks (replicated KV heads). One process group per world size runs every case.
"""

from __future__ import annotations

import functools

import pytest
import torch

from attnkit import Causal, Full, PerHead, Predicate, SlidingWindow, attention
from attnkit.distributed import (
    HybridMultiHeadAttention,
    UlyssesMultiHeadAttention,
    assemble,
    count_traffic,
    hybrid_attention,
    make_grid,
    record_ring_stats,
    ring_attention,
    sequence_parallel,
    shard,
    ulysses_attention,
)
from attnkit.distributed import ulysses as ulysses_module
from attnkit.distributed.costs import CallShape, scheme_bytes
from attnkit.distributed.heads import plan_rounds, split_heads
from attnkit.distributed.launch import run_group
from attnkit.nn import MultiHeadAttention
from attnkit.nn.rope import RotaryEmbedding
from attnkit.patterns import Fixed, Strided

N = 48  # splits into 2P chunks for P = 2, 3, 4
DEADLINE_S = 240


def _no_multiples_of_five(i, j):  # rows at multiples of 5 see no key: zeros and LSE -inf
    return (j <= i) & (i % 5 != 0)


# name: (pattern, layout, batch, q heads, kv heads, dtype)
CASES = {
    "mha-causal-zigzag": (Causal(), "zigzag", 1, 4, 4, torch.float64),
    "mha-5-full-striped": (Full(), "striped", 2, 5, 5, torch.float64),
    "gqa-8-2-causal-contiguous": (Causal(), "contiguous", 1, 8, 2, torch.float64),
    "gqa-6-3-window-contiguous": (SlidingWindow(7), "contiguous", 2, 6, 3, torch.float64),
    "mqa-6-1-strided-zigzag": (Strided(5), "zigzag", 1, 6, 1, torch.float64),
    "union-window-fixed-striped": (SlidingWindow(3) | Fixed(8, 2), "striped", 1, 4, 2, torch.float64),
    "per-head-zigzag": (PerHead((Causal(), SlidingWindow(5), Full(), Strided(4))), "zigzag", 1, 4, 2, torch.float64),
    "masked-rows-contiguous": (Predicate(_no_multiples_of_five), "contiguous", 1, 4, 2, torch.float64),
    "gqa-float32-zigzag": (Causal(), "zigzag", 2, 8, 2, torch.float32),
}
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4}
GRIDS = {2: [(2, 1), (1, 2)], 3: [(3, 1), (1, 3)], 4: [(2, 2), (4, 1)]}
"""Hybrid grids ``(ulysses degree, ring degree)`` run at each world size."""


def _full_problem(name):
    pattern, layout, batch, n_heads, n_kv_heads, dtype = CASES[name]
    g = torch.Generator().manual_seed(sorted(CASES).index(name))
    q = torch.randn(batch, n_heads, N, 8, generator=g, dtype=torch.float64)
    k = torch.randn(batch, n_kv_heads, N, 8, generator=g, dtype=torch.float64)
    v = torch.randn(batch, n_kv_heads, N, 6, generator=g, dtype=torch.float64)  # Dv != D on purpose
    d_out = torch.randn(batch, n_heads, N, 6, generator=g, dtype=torch.float64)
    d_lse = torch.randn(batch, n_heads, N, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v, d_out, d_lse)]


def _run(call, name, with_lse=True):
    pattern, layout, *_ = CASES[name]
    q, k, v, d_out, d_lse = (shard(t, layout) for t in _full_problem(name))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    if with_lse:
        out, lse = call(q, k, v, pattern, layout=layout, return_lse=True, timeout=60)
        ((out * d_out).sum() + (lse.masked_fill(torch.isinf(lse), 0) * d_lse).sum()).backward()
    else:
        out, lse = call(q, k, v, pattern, layout=layout, timeout=60), None
        (out * d_out).sum().backward()
    return {"out": out, "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}


def _layer_problem():
    torch.manual_seed(7)
    layer = MultiHeadAttention(24, 6, 2, pattern=Causal(), rope=RotaryEmbedding(4, theta=100.0)).double()
    x = torch.randn(2, N, 24, dtype=torch.float64)
    weight = torch.randn(2, N, 24, dtype=torch.float64)
    return layer, x, weight


def _run_cases(rank, world):
    results = {"ulysses": {}, "hybrid": {}}
    for name in CASES:
        results["ulysses"][name] = _run(ulysses_attention, name)
    grids = {}
    for u, r in GRIDS[world]:
        grid = grids[u, r] = make_grid(u)
        assert grid.rank == rank and (grid.ulysses_degree, grid.ring_degree) == (u, r)

        def hybrid(*args, **kwargs):
            return hybrid_attention(*args, ulysses_group=grid.ulysses_group, ring_group=grid.ring_group, **kwargs)

        results["hybrid"][u, r] = {name: _run(hybrid, name) for name in CASES}
    # Without return_lse (no LSE exchange), and one KV head per round (forced rounds).
    results["no-lse"] = _run(ulysses_attention, "gqa-6-3-window-contiguous", with_lse=False)
    ulysses_module.ROUND_BYTES, saved = 1, ulysses_module.ROUND_BYTES
    results["rounds"] = _run(ulysses_attention, "gqa-6-3-window-contiguous")
    u, r = GRIDS[world][0]
    results["hybrid-rounds"] = _run(
        lambda *a, **kw: hybrid_attention(*a, ulysses_group=grids[u, r].ulysses_group,
                                          ring_group=grids[u, r].ring_group, **kw),
        "mqa-6-1-strided-zigzag",
    )
    ulysses_module.ROUND_BYTES = saved
    # Training through an unchanged MultiHeadAttention, each scheme by name.
    layer, x, weight = _layer_problem()
    results["layers"] = {}
    for scheme in ("ring", "ulysses", "hybrid"):
        sharded = sequence_parallel(layer, scheme, grids[GRIDS[world][0]], layout="zigzag", timeout=60)
        layer.zero_grad()
        x_shard = shard(x, "zigzag", dim=1).requires_grad_()
        (sharded(x_shard) * shard(weight, "zigzag", dim=1)).sum().backward()
        grads = {}
        for param_name, param in layer.named_parameters():
            torch.distributed.all_reduce(param.grad)
            grads[param_name] = param.grad.clone()
        results["layers"][scheme] = {"dx": x_shard.grad, "grads": grads, "type": type(sharded).__name__}
    results["nan"] = _nan_runs(grids[GRIDS[world][0]])
    results["errors"] = _bad_calls(rank, world, grids[GRIDS[world][0]])
    results["traffic"] = _traffic(rank, world, grids)
    return results


NAN_PATTERN, NAN_LAYOUT = SlidingWindow(6), "contiguous"


def _nan_problem():
    """A NaN key and an inf value at position 2: rows 2-7 may see them, rows from 8 on may not."""
    g = torch.Generator().manual_seed(11)
    q = torch.randn(1, 4, N, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, N, 8, generator=g, dtype=torch.float64) for _ in range(2))
    k[:, :, 2], v[:, :, 2] = float("nan"), float("inf")
    return q, k, v


def _nan_outputs(call, q, k, v, read):
    """Out and the gradients of a loss that reads only the rows ``read (N or N/P,)`` (no NaN)."""
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, NAN_PATTERN) if call is attention else call(q, k, v, NAN_PATTERN, layout=NAN_LAYOUT, timeout=60)
    (out * read[:, None]).sum().backward()
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def _read_rows():
    return (torch.arange(N) >= 8).double()


def _nan_runs(grid):
    shards = [shard(t, NAN_LAYOUT) for t in _nan_problem()] + [shard(_read_rows(), NAN_LAYOUT, dim=0)]
    hybrid = functools.partial(hybrid_attention, ulysses_group=grid.ulysses_group, ring_group=grid.ring_group)
    return {name: _nan_outputs(call, *shards) for name, call in
            (("ring", ring_attention), ("ulysses", ulysses_attention), ("hybrid", hybrid))}


def _bad_calls(rank, world, grid):
    errors = {}
    qkv = [torch.randn(1, 4, 4, 4) for _ in range(3)]
    calls = {
        "scheme": lambda: (ulysses_attention if rank == 0 else ring_attention)(*qkv, timeout=30),
        "degree above heads": lambda: ulysses_attention(*(torch.randn(1, 1, 4, 4) for _ in range(3)), timeout=30),
        "pattern": lambda: ulysses_attention(*qkv, Causal() if rank == 0 else SlidingWindow(4), timeout=30),
        "hybrid shards": lambda: hybrid_attention(
            *(torch.randn(1, 4, 4 if rank == world - 1 else 6, 4) for _ in range(3)),
            ulysses_group=grid.ulysses_group, ring_group=grid.ring_group, timeout=30),
        "hybrid scale on last rank": lambda: hybrid_attention(
            *qkv, scale=float("nan") if rank == world - 1 else 0.5,
            ulysses_group=grid.ulysses_group, ring_group=grid.ring_group, timeout=30),
        "not a grid": lambda: hybrid_attention(
            *qkv, ulysses_group=grid.ulysses_group, ring_group=grid.ulysses_group, timeout=30),
    }
    for name, call in calls.items():
        try:
            call()
            errors[name] = "no error"
        except (ValueError, TypeError) as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
    return errors


TRAFFIC_SHAPE = CallShape(batch=1, seq=384, q_heads=6, kv_heads=2, head_dim=32, value_dim=32, itemsize=4)


def _traffic(rank, world, grids):
    """Bytes counted by the wrapper around torch.distributed for each scheme (forward + backward)."""
    s = TRAFFIC_SHAPE
    g = torch.Generator().manual_seed(rank)
    n = s.seq // world
    q = torch.randn(s.batch, s.q_heads, n, s.head_dim, generator=g).requires_grad_()
    k, v = (torch.randn(s.batch, s.kv_heads, n, s.head_dim, generator=g).requires_grad_() for _ in range(2))
    counted = {}
    calls = {"ring": lambda: ring_attention(q, k, v, Causal(), timeout=60),
             "ulysses": lambda: ulysses_attention(q, k, v, Causal(), timeout=60)}
    for (u, r), grid in grids.items():
        calls[f"hybrid {u}x{r}"] = lambda grid=grid: hybrid_attention(
            q, k, v, Causal(), ulysses_group=grid.ulysses_group, ring_group=grid.ring_group, timeout=60)
    for name, call in calls.items():
        with count_traffic() as traffic, record_ring_stats() as stats:
            call().sum().backward()
        counted[name] = (traffic.bytes_sent, stats.bytes_sent)
    return counted


@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda p: f"P{p}")
def schemes_run(request):
    world = request.param
    ranks = run_group(_run_cases, world, deadline_s=DEADLINE_S, group_timeout_s=90)
    failed = [f"rank {r.rank}: {r.error}" for r in ranks if not r.ok]
    assert not failed, failed
    return world, [r.value for r in ranks]


def _expected(name, with_lse=True):
    pattern = CASES[name][0]
    q, k, v, d_out, d_lse = (t.double() for t in _full_problem(name))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = attention(q, k, v, pattern, backend="reference", return_lse=True)
    loss = (out * d_out).sum()
    if with_lse:
        loss = loss + (lse.masked_fill(torch.isinf(lse), 0) * d_lse).sum()
    loss.backward()
    return {"out": out, "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}


def _check(values, name, label, with_lse=True):
    layout, dtype = CASES[name][1], CASES[name][-1]
    for key, reference in _expected(name, with_lse).items():
        if key == "lse" and not with_lse:
            continue
        got = assemble([value[key] for value in values], layout).detach()
        reference = reference.detach()
        seen = torch.isfinite(reference)
        assert torch.equal(torch.isfinite(got), seen), f"{label}: {key} finite where the reference is not"
        error = float((got.double()[seen] - reference[seen]).abs().max() / reference[seen].abs().max())
        assert error < TOLERANCE[dtype], f"{label}: {key} relative error {error:.2e}"


@pytest.mark.parametrize("name", CASES)
def test_ulysses_equals_single_process_attention(schemes_run, name):
    world, values = schemes_run
    _check([value["ulysses"][name] for value in values], name, f"ulysses {name} P={world}")


@pytest.mark.parametrize("name", CASES)
def test_hybrid_equals_single_process_attention(schemes_run, name):
    world, values = schemes_run
    for grid in GRIDS[world]:
        _check([value["hybrid"][grid][name] for value in values], name, f"hybrid {grid} {name} P={world}")


def test_without_lse_and_in_rounds(schemes_run):
    world, values = schemes_run
    _check([value["no-lse"] for value in values], "gqa-6-3-window-contiguous", "no lse", with_lse=False)
    _check([value["rounds"] for value in values], "gqa-6-3-window-contiguous", "rounds")
    _check([value["hybrid-rounds"] for value in values], "mqa-6-1-strided-zigzag", "hybrid rounds")


def test_training_through_multi_head_attention_by_scheme_name(schemes_run):
    world, values = schemes_run
    layer, x, weight = _layer_problem()
    x = x.requires_grad_()
    (layer(x) * weight).sum().backward()
    for scheme in ("ring", "ulysses", "hybrid"):
        assert values[0]["layers"][scheme]["type"] == f"{scheme.title()}MultiHeadAttention"
        dx = assemble([value["layers"][scheme]["dx"] for value in values], "zigzag", dim=1)
        assert float((dx - x.grad).abs().max() / x.grad.abs().max()) < 1e-6, scheme
        for param_name, param in layer.named_parameters():
            for value in values:
                got = value["layers"][scheme]["grads"][param_name]
                assert float((got - param.grad).abs().max() / param.grad.abs().max()) < 1e-6, (scheme, param_name)


def test_nan_in_hidden_keys_reaches_only_the_rows_that_may_see_it(schemes_run):
    # The single-process rule: a row's output (and the gradients through it) depend only on the
    # keys and values it may see.
    world, values = schemes_run
    expected = _nan_outputs(attention, *_nan_problem(), _read_rows())
    assert torch.isfinite(expected["out"][..., 8:, :]).all() and torch.isfinite(expected["dk"]).all()
    for scheme in ("ring", "ulysses", "hybrid"):
        for key, reference in expected.items():
            got = assemble([value["nan"][scheme][key] for value in values], NAN_LAYOUT)
            torch.testing.assert_close(got, reference, equal_nan=True, msg=f"{scheme} {key} P={world}")


def test_bad_input_is_rejected_on_every_rank(schemes_run):
    world, values = schemes_run
    for rank, value in enumerate(values):
        errors = value["errors"]
        mine, other = ("ulysses", "ring") if rank == 0 else ("ring", "ulysses")
        assert errors["scheme"].startswith(f"ValueError: {'ulysses_attention' if rank == 0 else 'ring_attention'}: "
                                           f"ranks run different schemes: rank {rank} runs {mine}"), errors["scheme"]
        assert errors["degree above heads"] == (
            f"ValueError: Ulysses degree {world} exceeds the 1 query heads: every rank needs at least one head; "
            "use at most 1 Ulysses ranks (hybrid_attention runs a ring across the rest)")
        assert errors["pattern"].startswith("ValueError: ulysses_attention: ranks pass different patterns")
        assert errors["hybrid shards"].startswith("ValueError: hybrid_attention: "), errors["hybrid shards"]
        nan_scale = "ValueError: scale must be finite, got nan"
        heard = f"ValueError: hybrid_attention: rank {world - 1} cannot take part: {nan_scale}"
        # Ranks outside the faulty rank's Ulysses group hear of it through their ring group.
        assert errors["hybrid scale on last rank"] == (nan_scale if rank == world - 1 else heard), errors
        assert "ulysses_group and ring_group must meet in this rank only" in errors["not a grid"]


def test_bytes_counted_by_the_wrapper_match_the_cost_model(schemes_run):
    world, values = schemes_run
    for rank, value in enumerate(values):
        for name, (counted, own_count) in value["traffic"].items():
            scheme, _, grid = name.partition(" ")
            u = int(grid.split("x")[0]) if grid else None
            expected = scheme_bytes(scheme, TRAFFIC_SHAPE, world, ulysses_degree=u, rank=rank)
            assert abs(counted - expected) <= 0.05 * expected, (name, rank, counted, expected)
            assert counted >= own_count  # the wrapper also sees the agreement check
    # With Hkv = 2 < P = 3 or 4 every KV head is replicated: Ulysses sends more K/V than at P = 2.
    assert values[0]["traffic"]["ulysses"][0] > 0


def test_head_split_uneven_and_replicated():
    assert split_heads(8, 8, 3).q == ((0, 3), (3, 6), (6, 8))
    assert split_heads(32, 8, 3).kv == ((0, 3), (3, 6), (6, 8)) and split_heads(32, 8, 3).q[2] == (24, 32)
    replicated = split_heads(8, 2, 4)
    assert replicated.q == ((0, 2), (2, 4), (4, 6), (6, 8)) and replicated.kv == ((0, 1), (0, 1), (1, 2), (1, 2))
    assert split_heads(6, 1, 4).kv == ((0, 1),) * 4
    with pytest.raises(ValueError, match="Ulysses degree 5 exceeds the 4 query heads"):
        split_heads(4, 2, 5)
    rounds = plan_rounds(split_heads(12, 6, 2), 2, 2)  # 3 KV heads per rank, 2 per round
    assert [r.kv for r in rounds] == [((0, 2), (3, 5)), ((2, 3), (5, 6))]
    assert [r.q for r in rounds] == [((0, 4), (6, 10)), ((4, 6), (10, 12))]
    uneven = plan_rounds(split_heads(6, 3, 2), 2, 1)  # rank 1 has one KV head: it sits out round 2
    assert [r.kv for r in uneven] == [((0, 1), (2, 3)), ((1, 2), (2, 2))]
    assert uneven[1].q == ((2, 4), (4, 4))
    # Query heads 3-5 of groups of 4 use KV heads 0 and 1 unevenly: one KV head per round.
    cut = plan_rounds(split_heads(8, 2, 3), 4, 8)
    assert [r.q for r in cut] == [((0, 3), (3, 4), (6, 8)), ((0, 0), (4, 6), (6, 6))]


def test_layers_refuse_a_wrong_layer_or_grid():
    with pytest.raises(TypeError, match="layer must be an attnkit MultiHeadAttention"):
        UlyssesMultiHeadAttention(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="grid must be a ParallelGrid"):
        HybridMultiHeadAttention(MultiHeadAttention(8, 2), grid=None)
