"""Ring attention on 2, 3 and 4 spawned gloo processes against single-process float64 attention.

Every case compares out, LSE, dq, dk and dv separately (max error relative to the largest entry:
1e-6 in float64, 1e-4 in float32). One process group per world size runs every case, because
starting processes is the slow part; the faults each need a group of their own. Every group has a
deadline, so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import functools
import math
import os
import re
import time

import pytest
import torch

from attnkit import BlockSparse, Causal, Full, Predicate, SlidingWindow, attention
from attnkit.patterns import Fixed, Strided
from attnkit.distributed import (
    LAYOUTS,
    RingMultiHeadAttention,
    assemble,
    record_ring_stats,
    ring_attention,
    ring_schedule,
    shard,
    unshard,
)
from attnkit.distributed import local as local_module
from attnkit.distributed import ring as ring_module
from attnkit.distributed.agreement import pattern_fingerprint
from attnkit.distributed.comm import RingComm
from attnkit.distributed.launch import run_group
from attnkit.kernels.blockwise import blockwise_kernel
from attnkit.nn import MultiHeadAttention
from attnkit.nn.rope import RotaryEmbedding

N = 48  # splits into 2P chunks for P = 2, 3, 4
DEADLINE_S = 150


# name: (pattern, layout, batch, q heads, kv heads, dtype)
CASES = {
    "full-zigzag": (Full(), "zigzag", 1, 4, 4, torch.float64),
    "causal-contiguous": (Causal(), "contiguous", 2, 4, 4, torch.float64),
    "causal-zigzag": (Causal(), "zigzag", 2, 4, 4, torch.float64),
    "causal-striped": (Causal(), "striped", 2, 4, 4, torch.float64),
    "gqa-8-2-causal-zigzag": (Causal(), "zigzag", 1, 8, 2, torch.float64),
    "mqa-8-1-causal-striped": (Causal(), "striped", 1, 8, 1, torch.float64),
    "window-5-contiguous": (SlidingWindow(5), "contiguous", 1, 2, 2, torch.float64),
    "window-30-contiguous": (SlidingWindow(30), "contiguous", 2, 4, 2, torch.float64),
    "window-7-bidi-zigzag": (SlidingWindow(7, causal=False), "zigzag", 1, 2, 1, torch.float64),
    "strided-5-zigzag": (Strided(5), "zigzag", 1, 4, 2, torch.float64),
    "fixed-8-2-striped": (Fixed(8, 2), "striped", 1, 2, 2, torch.float64),
    "causal-zigzag-float32": (Causal(), "zigzag", 2, 8, 2, torch.float32),
}
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4}


def _full_problem(name):
    pattern, layout, batch, n_heads, n_kv_heads, dtype = CASES[name]
    g = torch.Generator().manual_seed(sorted(CASES).index(name))
    q = torch.randn(batch, n_heads, N, 8, generator=g, dtype=torch.float64)
    k = torch.randn(batch, n_kv_heads, N, 8, generator=g, dtype=torch.float64)
    v = torch.randn(batch, n_kv_heads, N, 6, generator=g, dtype=torch.float64)  # Dv != D on purpose
    d_out = torch.randn(batch, n_heads, N, 6, generator=g, dtype=torch.float64)
    d_lse = torch.randn(batch, n_heads, N, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v, d_out, d_lse)]


def _layer_problem():
    torch.manual_seed(7)
    layer = MultiHeadAttention(16, 4, 2, pattern=Causal(), rope=RotaryEmbedding(4, theta=100.0)).double()
    x = torch.randn(2, N, 16, dtype=torch.float64)
    weight = torch.randn(2, N, 16, dtype=torch.float64)
    return layer, x, weight


def _run_cases(rank, world):
    results = {}
    for name, (pattern, layout, *_rest) in CASES.items():
        q, k, v, d_out, d_lse = (shard(t, layout) for t in _full_problem(name))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        with record_ring_stats() as stats:
            out, lse = ring_attention(q, k, v, pattern, layout=layout, return_lse=True, timeout=60)
            ((out * d_out).sum() + (lse * d_lse).sum()).backward()
        results[name] = {"out": out, "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad,
                         "steps": stats.forward_steps, "sent": stats.bytes_sent}
    # Long shards go round head group by head group; force one KV head per message.
    name = "gqa-8-2-causal-zigzag"
    q, k, v, d_out, d_lse = (shard(t, "zigzag") for t in _full_problem(name))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    ring_module.MESSAGE_BYTES, saved = 1, ring_module.MESSAGE_BYTES
    out, lse = ring_attention(q, k, v, Causal(), layout="zigzag", return_lse=True, timeout=60)
    ((out * d_out).sum() + (lse * d_lse).sum()).backward()
    ring_module.MESSAGE_BYTES = saved
    results[name + "-head-by-head"] = {"out": out, "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}
    # Training through an unchanged MultiHeadAttention, sequence-sharded, RoPE at global positions.
    layer, x, weight = _layer_problem()
    ring_layer = RingMultiHeadAttention(layer, layout="zigzag", timeout=60)
    x_shard = shard(x, "zigzag", dim=1).requires_grad_()
    (ring_layer(x_shard) * shard(weight, "zigzag", dim=1)).sum().backward()
    grads = {}
    for param_name, param in layer.named_parameters():
        torch.distributed.all_reduce(param.grad)
        grads[param_name] = param.grad
    results["layer"] = {"dx": x_shard.grad, "grads": grads}
    results["errors"] = _bad_calls(rank, world)
    full = torch.randn(2, 3, N, 5, generator=torch.Generator().manual_seed(3))
    results["unshard"] = {layout: torch.equal(unshard(shard(full, layout), layout), full) for layout in LAYOUTS}
    return results


def _every_third(i, j):
    return (i - j) % 3 == 0


def _window(w):
    return Predicate(lambda i, j: (j <= i) & (i - j < w))


def _bad_calls(rank, world):
    """Calls that must fail on every rank with an error naming the problem (and two that must not)."""
    errors = {}
    shard_len = 6 if rank == 0 else 8  # ranks disagree on the shard length
    qkv = [torch.randn(1, 2, 4, 4) for _ in range(3)]
    period = 2 if rank == 0 else 3  # one lambda, another captured value on rank 0
    calls = {
        "mismatch": lambda: ring_attention(*(torch.randn(1, 2, shard_len, 4) for _ in range(3)), timeout=30),
        "pattern": lambda: ring_attention(*qkv, Causal() if rank == 0 else SlidingWindow(4), timeout=30),
        "predicate": lambda: ring_attention(*qkv, Predicate(lambda i, j: (i - j) % period == 0), timeout=30),
        "scale": lambda: ring_attention(*qkv, scale=0.5 if rank == 0 else 0.25, timeout=30),
        "same predicate": lambda: ring_attention(*qkv, Predicate(_every_third), timeout=30),
        "same block layout": lambda: ring_attention(  # equal tensors, distinct objects
            *qkv, BlockSparse(torch.ones(2 * world, 2 * world, dtype=torch.bool).tril(), 2), timeout=30),
        # Invalid on some ranks only: the valid ranks must raise too, not wait for the others.
        "layout on some ranks": lambda: ring_attention(
            *qkv, BlockSparse(torch.ones(2 * world if rank == 0 else world, 2 * world if rank == 0 else world,
                                         dtype=torch.bool).tril(), 2), timeout=30),
        "scale on rank 1": lambda: ring_attention(*qkv, scale=float("nan") if rank == 1 else 0.5, timeout=30),
        "window off by one": lambda: ring_attention(*qkv, _window(3 if rank == 0 else 4), timeout=30),
        "unsplittable": lambda: ring_attention(*(torch.randn(1, 2, 5, 4) for _ in range(3)), layout="zigzag", timeout=30),
        "layout": lambda: ring_attention(*(torch.randn(1, 2, 4, 4) for _ in range(3)), layout="ring"),
        "gqa": lambda: ring_attention(torch.randn(1, 3, 4, 4), torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)),
        "timeout": lambda: ring_attention(*(torch.randn(1, 2, 4, 4) for _ in range(3)), timeout=0),
    }
    for name, call in calls.items():
        try:
            call()
            errors[name] = "no error"
        except (ValueError, TypeError) as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
    return errors


@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda p: f"P{p}")
def ring_run(request):
    world = request.param
    ranks = run_group(_run_cases, world, deadline_s=DEADLINE_S, group_timeout_s=60)
    failed = [f"rank {r.rank}: {r.error}" for r in ranks if not r.ok]
    assert not failed, failed
    return world, [r.value for r in ranks]


def _relative_error(got, expected):
    got, expected = got.detach().double(), expected.detach().double()
    return float((got - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("name", [*CASES, "gqa-8-2-causal-zigzag-head-by-head"])
def test_ring_equals_single_process_attention(ring_run, name):
    world, values = ring_run
    case = name.removesuffix("-head-by-head")
    pattern, layout, *_rest, dtype = CASES[case]
    q, k, v, d_out, d_lse = (t.double() for t in _full_problem(case))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = attention(q, k, v, pattern, backend="reference", return_lse=True)
    ((out * d_out).sum() + (lse * d_lse).sum()).backward()
    expected = {"out": out, "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}
    for key, reference in expected.items():
        got = assemble([value[name][key] for value in values], layout)
        assert got.dtype == dtype
        error = _relative_error(got, reference)
        assert error < TOLERANCE[dtype], f"{name} P={world}: {key} relative error {error:.2e}"


def test_window_steps_and_transfers(ring_run):
    world, values = ring_run
    shard_len = N // world
    for name, window in (("window-5-contiguous", 5), ("window-30-contiguous", 30)):
        steps = values[0][name]["steps"]
        assert steps == min(world, math.ceil((window - 1) / shard_len) + 1)
        assert steps <= math.ceil(window / shard_len) + 1
        assert steps == ring_schedule(SlidingWindow(window), "contiguous", N, world).steps
    # Per extra step: K/V forward, K/V again backward, the dK/dV accumulator; then dK/dV go home.
    # Window 5 over shards of >= 12 tokens needs one extra step whatever P is.
    kv_bytes = 1 * 2 * shard_len * (8 + 6) * 8  # batch 1, Hkv 2, D 8 + Dv 6, float64
    assert values[0]["window-5-contiguous"]["sent"] == kv_bytes * (3 * 1 + 1)
    # GQA: only the 2 KV heads travel, not the 8 query heads; all P steps run.
    assert values[0]["gqa-8-2-causal-zigzag"]["sent"] == kv_bytes * (3 * (world - 1) + 1)


def test_training_through_multi_head_attention_with_rope(ring_run):
    world, values = ring_run
    layer, x, weight = _layer_problem()
    x = x.requires_grad_()
    (layer(x) * weight).sum().backward()
    dx = assemble([value["layer"]["dx"] for value in values], "zigzag", dim=1)
    assert _relative_error(dx, x.grad) < 1e-6
    for param_name, param in layer.named_parameters():
        for value in values:  # every rank holds the same summed gradient
            assert _relative_error(value["layer"]["grads"][param_name], param.grad) < 1e-6, param_name


def test_unshard_gathers_the_full_tensor_on_every_rank(ring_run):
    _, values = ring_run
    assert all(all(value["unshard"].values()) for value in values)


def test_bad_input_is_rejected_on_every_rank(ring_run):
    world, values = ring_run
    for rank, value in enumerate(values):
        errors = value["errors"]
        assert errors["mismatch"].startswith("ValueError: ring_attention: shards differ across ranks")
        assert "q (1, 2, 6, 4)" in errors["mismatch"] and "q (1, 2, 8, 4)" in errors["mismatch"]
        assert errors["unsplittable"].startswith(f"ValueError: a sequence of {5 * world} tokens cannot be split")
        assert errors["layout"].startswith("ValueError: layout must be one of contiguous, zigzag, striped")
        assert errors["gqa"].startswith("ValueError: query heads (3) must be a multiple of key/value heads (2)")
        assert errors["timeout"].startswith("ValueError: timeout must be a positive, finite number of seconds")
        # Different patterns would run and give wrong gradients: refused on every rank instead.
        other = "SlidingWindow(size=4, causal=True)" if rank == 0 else "Causal()"
        mine = "Causal()" if rank == 0 else "SlidingWindow(size=4, causal=True)"
        assert errors["pattern"] == (
            f"ValueError: ring_attention: ranks pass different patterns: rank {rank} has {mine}, "
            f"rank {1 if rank == 0 else 0} has {other}; every rank must pass the same pattern"
        )
        assert errors["predicate"].startswith("ValueError: ring_attention: ranks pass different patterns")
        assert errors["predicate"].count("has Predicate(fn=<function _bad_calls.<locals>.<lambda>") == 2
        assert errors["scale"].startswith("ValueError: ring_attention: shards differ across ranks")
        assert errors["scale"].endswith("another scale")
        assert errors["same predicate"] == "no error" and errors["same block layout"] == "no error"
        assert errors["window off by one"].startswith("ValueError: ring_attention: ranks pass different patterns")
        heard_from_rank_1 = "ValueError: ring_attention: rank 1 cannot take part: "
        bad_layout = f"ValueError: BlockSparse: layout of shape ({world}, {world}) with block_size 2 does not match"
        if rank == 0:  # the one valid rank hears what went wrong on rank 1 (before: it lost rank 1)
            assert errors["layout on some ranks"].startswith(f"{heard_from_rank_1}{bad_layout}")
        else:
            assert errors["layout on some ranks"].startswith(bad_layout)
        nan_scale = "ValueError: scale must be finite, got nan"
        assert errors["scale on rank 1"] == (nan_scale if rank == 1 else f"{heard_from_rank_1}{nan_scale}")


class _Window:
    def __init__(self, w):
        self.w = w

    def allows(self, i, j):
        return (j <= i) & (i - j < self.w)


_GLOBAL_WINDOW = {"w": 1024}


def _global_window(i, j):  # reads a global: out of the structure's reach, seen only by sampling
    return (j <= i) & (i - j < _GLOBAL_WINDOW["w"])


def test_fingerprint_sees_values_captured_by_a_predicate():
    # Before: functions hashed as module + name only, and the sample missed w vs w + 1 at this length.
    n = 32768
    for w in (100, 1000, 3000):
        assert pattern_fingerprint(_window(w), n) != pattern_fingerprint(_window(w + 1), n), w
        assert pattern_fingerprint(_window(w), n) == pattern_fingerprint(_window(w), n)
    bound = [pattern_fingerprint(Predicate(_Window(w).allows), n) for w in (1000, 2000, 1000)]
    assert bound[0] != bound[1] and bound[0] == bound[2]
    by_default = [Predicate(lambda i, j, w=w: (j <= i) & (i - j < w)) for w in (500, 501)]
    assert pattern_fingerprint(by_default[0], n) != pattern_fingerprint(by_default[1], n)
    partials = [Predicate(functools.partial(_window_rule, w=w)) for w in (700, 701)]
    assert pattern_fingerprint(partials[0], n) != pattern_fingerprint(partials[1], n)


def _window_rule(i, j, w):
    return (j <= i) & (i - j < w)


def test_fingerprint_samples_distances_on_a_log_scale(monkeypatch):
    n = 32768
    before = pattern_fingerprint(Predicate(_global_window), n)
    monkeypatch.setitem(_GLOBAL_WINDOW, "w", 1025)  # differs only at distance 1024
    assert pattern_fingerprint(Predicate(_global_window), n) != before


def test_fingerprint_hashes_a_block_layout_once_per_version():
    import gc

    from attnkit.distributed import agreement

    pattern = BlockSparse(torch.ones(4, 8, 8, dtype=torch.bool).tril(), 2)
    first = pattern_fingerprint(pattern, 16)
    assert id(pattern.layout) in agreement._digests  # the next call reuses the hash
    pattern.layout[0, 0, 1] = True  # an in-place change moves the version counter
    assert pattern_fingerprint(pattern, 16) != first
    key = id(pattern.layout)
    del pattern
    gc.collect()
    assert key not in agreement._digests


def test_blockwise_kernel_with_explicit_positions_matches_masked_softmax():
    torch.manual_seed(0)
    q_pos = torch.tensor([0, 1, 2, 13, 14, 20, 21, 22, 40])
    k_pos = torch.tensor([3, 4, 5, 6, 17, 18, 30, 31, 32, 33, 39])
    q = torch.randn(2, 4, len(q_pos), 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, len(k_pos), 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, len(k_pos), 8, dtype=torch.float64, requires_grad=True)
    every_third = Predicate(lambda i, j: (i - j) % 3 == 0)
    for pattern in (Causal(), SlidingWindow(9), SlidingWindow(4, causal=False), Strided(5), every_third, Full()):
        out, lse = blockwise_kernel(q, k, v, pattern, 0.3, block_q=2, block_k=3, positions=(q_pos, k_pos))
        allowed = pattern.rows_mask(q_pos, k_pos)
        scores = torch.matmul(q, k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.3
        scores = scores.masked_fill(~allowed, float("-inf"))
        expected_lse = torch.logsumexp(scores, -1)
        weights = torch.softmax(scores, -1).nan_to_num()
        expected = torch.matmul(weights, v.repeat_interleave(2, 1))
        torch.testing.assert_close(out, expected)
        seen = torch.isfinite(expected_lse)
        assert torch.equal(torch.isfinite(lse), seen)
        torch.testing.assert_close(lse[seen], expected_lse[seen])
        grads = torch.autograd.grad(out.sum() + lse[seen].sum(), (q, k, v))
        expected_grads = torch.autograd.grad(expected.sum() + expected_lse[seen].sum(), (q, k, v))
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want)


def _dies_mid_ring(rank, world):
    if rank == 1:  # joins, passes the agreement check, then dies while computing its first step
        local_module.attention = lambda *args, **kwargs: os._exit(3)
    start = time.monotonic()
    q, k, v = (torch.randn(1, 2, 8, 4, requires_grad=True) for _ in range(3))
    try:  # rank 1's first transfer may be through before it dies; then the backward's fails
        ring_attention(q, k, v, Full(), layout="contiguous", timeout=5).sum().backward()
    except RuntimeError as exc:
        return {"seconds": time.monotonic() - start, "error": str(exc)}
    return {"seconds": time.monotonic() - start, "error": "no error"}


def _posts_to_a_dead_peer(rank, world):
    comm = RingComm(None, 5, None)
    comm.wait(comm.exchange(torch.zeros(4), rank + 1, torch.empty(4), rank - 1, "warm-up"))
    if rank == 1:
        os._exit(3)
    time.sleep(1.5)  # long enough for rank 0 to see the connection close
    try:
        comm.wait(comm.exchange(torch.zeros(4), rank + 1, torch.empty(4), rank - 1, "backward step 2 keys/values"))
    except RuntimeError as exc:
        return str(exc)
    return "no error"


def _never_calls(rank, world):
    if rank == 1:  # alive and in the group, but never takes part
        time.sleep(4)
        return {}
    start = time.monotonic()
    try:
        ring_attention(*(torch.randn(1, 2, 8, 4) for _ in range(3)), Causal(), timeout=2)
    except RuntimeError as exc:
        return {"seconds": time.monotonic() - start, "error": str(exc)}
    return {"seconds": time.monotonic() - start, "error": "no error"}


def test_a_peer_that_dies_mid_ring_is_an_error_naming_rank_peer_and_phase():
    ranks = run_group(_dies_mid_ring, 2, deadline_s=60, group_timeout_s=30)
    assert not ranks[1].ok and "exited with code 3" in ranks[1].error
    result = ranks[0].value
    assert re.match(r"ring attention: rank 0 (lost rank 1 during|could not start) (forward|backward) step 1 keys/values",
                    result["error"]), result["error"]
    assert "the peer died" in result["error"] or "a peer died" in result["error"]
    assert "GLHF" not in result["error"]  # gloo's boilerplate is trimmed
    assert result["seconds"] < 5 + 3


def test_a_closed_connection_at_posting_names_rank_peer_and_phase():
    # Gloo raises at once when a message is posted on a closed connection; that error used to
    # reach the caller bare ("Connection closed by peer"), without this rank, the peer or the phase.
    ranks = run_group(_posts_to_a_dead_peer, 2, deadline_s=60, group_timeout_s=30)
    message = ranks[0].value
    assert message.startswith("ring attention: rank 0 ")
    assert "backward step 2 keys/values (to rank 1, from rank 1)" in message
    # The closed-connection wording, not the timeout's ("a peer died, hung or never joined").
    assert re.search(r"(a connection is closed, a peer died|the connection closed, the peer died) \(.*[Cc]onnection",
                     message), message


def test_a_transfer_the_backend_refuses_is_not_blamed_on_a_peer(monkeypatch):
    # Before: every RuntimeError at posting read "a connection is closed, a peer died", bad usage too.
    def refuse(ops):
        raise RuntimeError("input tensor has to be contiguous")  # gloo's words for a transposed tensor

    monkeypatch.setattr(torch.distributed, "batch_isend_irecv", refuse)
    monkeypatch.setattr(torch.distributed, "P2POp", lambda *args: args)  # no process group here
    comm = object.__new__(RingComm)
    comm.group, comm.rank, comm.size, comm.stats = None, 0, 2, None
    with pytest.raises(RuntimeError) as info:
        comm.exchange(torch.zeros(4, 4).t(), 1, torch.empty(16), 1, "forward step 1 keys/values")
    assert str(info.value) == ("ring attention: rank 0 could not start forward step 1 keys/values "
                               "(to rank 1, from rank 1): input tensor has to be contiguous")


def test_a_peer_that_never_calls_times_out_within_the_timeout():
    # The exit grace is well below the group's timeout, yet long enough for a loaded machine to
    # tear two processes down (5 s was not, at a load average of 20 on 2 cores).
    ranks = run_group(_never_calls, 2, deadline_s=90, group_timeout_s=60, exit_grace_s=20)
    result = ranks[0].value
    assert result["error"].startswith("ring attention: rank 0 gave up on the agreement check "
                                      "(shapes, dtype, layout, scale, pattern, scheme) after 2 s waiting for rank 1")
    assert 2 <= result["seconds"] < 2 + 3
    # Nothing is left pending after the timeout, so the process exits by itself (a collective left
    # pending kept it alive until the group timeout, and run_group had to kill it).
    assert ranks[0].exit_code == 0


def test_a_peer_that_never_joins_fails_the_rendezvous_within_its_timeout():
    start = time.monotonic()
    ranks = run_group(_never_calls, 2, deadline_s=120, group_timeout_s=3, absent=(1,))
    assert len(ranks) == 1 and not ranks[0].ok
    assert "DistStoreError" in ranks[0].error or "timed out" in ranks[0].error.lower()
    assert time.monotonic() - start < 50  # spawning and importing torch took 31 s at load 20
