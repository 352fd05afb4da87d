"""The Triton kernels' score modifications (softcap, alibi, distance_bias) against the float64
reference: out, LSE and the gradients of q, k, v and of the slopes / table, for every kernel family
the launcher chooses (a band, causal, Strided's lattice parts, Fixed's segmented and summary parts,
block lists for documents and unions, the decode configuration), with GQA and Nq != Nk.

The kernels run in Triton's interpreter (16 x 16 tiles) on small shapes that still give each kernel
interior tiles (no element mask) and edge tiles; inputs are float32 (bf16 / fp16 once each, on
the same rounded values in float64). Each case first checks that the reference with and without
the modification differ beyond the tolerance, so a kernel that drops it fails; a mutation test
drops it from one launcher and watches the comparison fail.
"""

from __future__ import annotations

import os

import pytest
import torch

from attnkit import Causal, Document, Fixed, SlidingWindow, Strided, alibi, attention, distance_bias, softcap
from attnkit.kernels.triton_launch import DECODE_QUERIES, _decode_splits, kernel_parts, triton_available

if triton_available(torch.device("cpu")) is not None:
    pytest.skip("the Triton interpreter is not available here (TRITON_INTERPRET=1 and triton needed)",
                allow_module_level=True)

from attnkit.kernels import triton_band, triton_blocks  # noqa: E402  (imports Triton)
from attnkit.kernels.triton_blocks import BlocksPart  # noqa: E402

MODS = ("softcap", "alibi", "distance_bias")
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
CAP = 2.0

# name: (pattern, n_q, n_k, (Hq, Hkv), family the launcher must choose: "band" / "blocks" + part count)
CASES = {
    "window": (SlidingWindow(36), 40, 56, (2, 2), ("band", 1)),
    "causal-gqa": (Causal(), 37, 37, (2, 1), ("band", 1)),
    "strided": (Strided(4), 30, 40, (2, 1), ("band", 2)),
    "fixed": (Fixed(16, 4), 40, 40, (2, 2), ("band", 2)),
    "documents": (Causal() & Document([9, 0, 1, 22, 8]), 33, 40, (2, 1), ("blocks", 1)),
    "union": (SlidingWindow(6) | Strided(7), 35, 35, (2, 2), ("blocks", 1)),
    "decode": (SlidingWindow(64), 3, 90, (4, 2), ("band", 1)),
}


def _family(pattern) -> tuple[str, int]:
    parts = kernel_parts(pattern)
    return ("blocks" if isinstance(parts[0], BlocksPart) else "band", len(parts))


def _inputs(n_q, n_k, heads, dtype, mod, seed=0):
    g = torch.Generator().manual_seed(seed)
    hq, hkv = heads
    tensors = [torch.randn(1, hq, n_q, 16, generator=g), torch.randn(1, hkv, n_k, 16, generator=g),
               torch.randn(1, hkv, n_k, 8, generator=g)]
    grads = (torch.randn(1, hq, n_q, 8, generator=g), torch.randn(1, hq, n_q, generator=g))
    parameter = {"alibi": torch.rand(hq, generator=g) * 0.3,
                 "distance_bias": torch.randn(hq, 5, generator=g)}.get(mod)
    tensors = [t.to(dtype).double() for t in tensors]  # the values the low-precision inputs hold
    return tensors, grads, parameter


def _score_mod(mod, parameter):
    if mod == "softcap":
        return softcap(CAP)
    return {"alibi": alibi, "distance_bias": distance_bias, None: lambda p: None}[mod](parameter)


def _run(backend, pattern, tensors, grads, parameter, mod, dtype):
    leaves = [t.detach().to(dtype).clone().requires_grad_() for t in tensors]
    parameter_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    leaf_parameter = None if parameter is None else parameter.detach().to(parameter_dtype).clone().requires_grad_()
    out, lse = attention(*leaves, pattern, backend=backend, return_lse=True, score_mod=_score_mod(mod, leaf_parameter))
    d_out, d_lse = grads
    ((out * d_out.to(out.dtype)).sum() + (torch.where(torch.isfinite(lse), lse, 0.0) * d_lse.to(lse.dtype)).sum()).backward()
    results = {"out": out, "lse": lse, "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}
    if leaf_parameter is not None:
        results["dparameter"] = leaf_parameter.grad
    return {name: None if t is None else t.detach().double() for name, t in results.items()}


def _mismatches(got, want, dtype) -> list[str]:
    tolerance = TOLERANCE[dtype]
    bad = []
    for name, expected in want.items():
        if got[name] is None:
            bad.append(f"{name} (none)")
            continue
        finite = torch.isfinite(expected)
        scale = max(1.0, float(expected[finite].abs().max())) if finite.any() else 1.0
        close = torch.isclose(got[name], expected, atol=tolerance * scale, rtol=tolerance)
        if not bool(close.all()):
            bad.append(f"{name} (max error {float((got[name] - expected)[finite].abs().max()):.2e})")
    return bad


def _check(case, mod, dtype=torch.float32):
    pattern, n_q, n_k, heads, family = CASES[case]
    assert _family(pattern) == family, f"{case}: the launcher now chooses {_family(pattern)}"
    tensors, grads, parameter = _inputs(n_q, n_k, heads, dtype, mod)
    if case == "decode":  # the decode configuration, its keys split across programs
        q, k, v = (t.to(dtype) for t in tensors)
        assert n_q <= DECODE_QUERIES and sum(_decode_splits(kernel_parts(pattern), q, k, v)) > 1
    want = _run("reference", pattern, tensors, grads, parameter, mod, torch.float64)
    plain = _run("reference", pattern, tensors, grads, None, None, torch.float64)
    assert _mismatches(plain, {k: v for k, v in want.items() if k in plain}, dtype), \
        f"{case} {mod}: the modification changes nothing at this tolerance (the test could not fail)"
    got = _run("triton", pattern, tensors, grads, parameter, mod, dtype)
    assert not _mismatches(got, want, dtype), f"{case} {mod} {dtype}: {_mismatches(got, want, dtype)}"


@pytest.mark.parametrize("mod", MODS)
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_family_with_modification_equals_the_float64_reference(case, mod):
    _check(case, mod)


@pytest.mark.parametrize("case,mod,dtype", [("window", "softcap", torch.bfloat16),
                                            ("documents", "distance_bias", torch.bfloat16),
                                            ("causal-gqa", "alibi", torch.float16)])
def test_half_precision_inputs_keep_float32_statistics(case, mod, dtype):
    _check(case, mod, dtype)


def test_a_table_wider_than_every_distance_and_one_column():
    """R beyond the longest distance (no clamping) and R = 1 (every pair in the last column)."""
    pattern = SlidingWindow(12)
    for columns in (64, 1):
        g = torch.Generator().manual_seed(columns)
        tensors = [torch.randn(1, 2, 20, 16, generator=g).double(), torch.randn(1, 2, 20, 16, generator=g).double(),
                   torch.randn(1, 2, 20, 8, generator=g).double()]
        grads = (torch.randn(1, 2, 20, 8, generator=g), torch.randn(1, 2, 20, generator=g))
        table = torch.randn(2, columns, generator=g)
        want = _run("reference", pattern, tensors, grads, table, "distance_bias", torch.float64)
        got = _run("triton", pattern, tensors, grads, table, "distance_bias", torch.float32)
        assert not _mismatches(got, want, torch.float32), f"R = {columns}: {_mismatches(got, want, torch.float32)}"


@pytest.mark.parametrize("module,case,mod", [(triton_band, "window", "distance_bias"),
                                            (triton_blocks, "documents", "softcap")])
def test_dropping_the_modification_from_the_kernels_fails_the_check(monkeypatch, module, case, mod):
    """The comparison above catches a launcher that hands its kernels no modification."""
    plain = module.mod_arguments(None)
    monkeypatch.setattr(module, "mod_arguments", lambda score_mod, parameter_grad=False: dict(
        plain, **({"BR": 1} if parameter_grad else {})))
    pattern, n_q, n_k, heads, _ = CASES[case]
    tensors, grads, parameter = _inputs(n_q, n_k, heads, torch.float32, mod)
    want = _run("reference", pattern, tensors, grads, parameter, mod, torch.float64)
    got = _run("triton", pattern, tensors, grads, parameter, mod, torch.float32)
    assert _mismatches(got, want, torch.float32)


def test_parameter_gradients_are_deterministic():
    """The parameter gradient is summed from per-program shares in a fixed order (no atomics)."""
    pattern, n_q, n_k, heads, _ = CASES["union"]
    tensors, grads, parameter = _inputs(n_q, n_k, heads, torch.float32, "distance_bias")
    first = _run("triton", pattern, tensors, grads, parameter, "distance_bias", torch.float32)["dparameter"]
    again = _run("triton", pattern, tensors, grads, parameter, "distance_bias", torch.float32)["dparameter"]
    assert torch.equal(first, again)


def test_the_backend_takes_score_mods_and_still_refuses_callables():
    from attnkit.backends.base import make_problem
    from attnkit.backends.registry import backend_named

    q = torch.randn(1, 2, 4, 8)
    backend = backend_named("triton")
    for mod in (softcap(3.0), alibi(torch.ones(2)), distance_bias(torch.ones(2, 3))):
        assert backend.accepts(make_problem(q, q, q, Causal(), None, True, score_mod=mod)) is None
    refusal = backend.accepts(make_problem(q, q, q, Causal(), None, True, score_mod=lambda s, b, h, i, j: s))
    assert refusal is not None and "callable" in refusal
    assert os.environ.get("TRITON_INTERPRET") not in (None, "", "0")


def test_grad_share_returns_the_parameter_share():
    """``grad_share`` (ring attention, merged plans) gives the table's gradient share too, equal
    to the blockwise backward's."""
    from attnkit.backends.base import make_problem, tiled_grad_share
    from attnkit.backends.registry import backend_named

    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 2, 20, 16, generator=g), torch.randn(1, 1, 20, 16, generator=g), torch.randn(1, 1, 20, 8, generator=g)
    table = torch.randn(2, 6, generator=g)
    problem = make_problem(q, k, v, SlidingWindow(9), None, True, score_mod=distance_bias(table))
    out, lse = attention(q, k, v, SlidingWindow(9), backend="blockwise", return_lse=True, score_mod=distance_bias(table))
    d_out, d_lse = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    got = backend_named("triton").grad_share(problem, q, k, v, out, lse, d_out, d_lse)
    want = tiled_grad_share(problem, q, k, v, out, lse, d_out, d_lse)
    for name, a, b in zip(("dq", "dk", "dv", "dtable"), (*got[:3], got.params[0]), (*want[:3], want.params[0])):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=lambda m, name=name: f"{name}: {m}")
