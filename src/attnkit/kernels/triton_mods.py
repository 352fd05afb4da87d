"""Score modifications inside the Triton kernels (:mod:`.score_mods`: softcap, alibi, distance_bias).

Every kernel takes a ``MOD`` constexpr (:data:`NONE`, :data:`SOFTCAP`, :data:`ALIBI`,
:data:`DISTANCE`) and three arguments: ``BIAS`` (the slopes ``(Hq,)`` or the table ``(Hq, R)``,
float32, times ``log2(e)``), ``n_bias`` (1 or ``R``) and ``cap2`` (the soft-cap times ``log2(e)``).
Without a modification they are ``None``, which Triton takes as constexprs: the plain kernels
compile exactly as before (every use below sits under a ``MOD`` branch). The kernels' scores are
base 2, so the bias and the cap come scaled by ``log2(e)``: ``c * tanh(s / c)`` and ``s + b`` keep
their meaning in base 2.

For query position ``i``, key position ``j`` and query head ``h``, ``offset = j - i``:

- softcap: ``s -> cap2 * tanh(s / cap2)``; backward ``dS * (1 - t^2)`` with ``t = s' / cap2``;
- alibi: ``s -> s + BIAS[h] * offset``; ``dslopes[h] = sum dS * offset``;
- distance: ``s -> s + BIAS[h, min(|offset|, R - 1)]``; ``dtable[h, r] = sum of dS`` over pairs
  at distance index ``r``.

Parameter gradients come from the dQ pass (a program owns one query block of one head): each
program sums its block's share in registers and stores it into its own slots of a float32 buffer
(no atomics); the launcher sums the buffer in a fixed order (:func:`reduce_partials`). A program
owns ``BM // GRANULE`` slots (its share in the first, zeros in the others), so the buffer's layout
does not depend on the tile size the autotuner picks.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .common import LOG2E
from .score_mods import ScoreMod

NONE, SOFTCAP, ALIBI, DISTANCE = 0, 1, 2, 3
_CODES = {"softcap": SOFTCAP, "alibi": ALIBI, "distance_bias": DISTANCE}
GRANULE = 16
"""Query rows per slot of the parameter-gradient buffer (the smallest query tile of a dQ pass)."""
_GRANULE = tl.constexpr(GRANULE)
_TWO_LOG2E = tl.constexpr(2 * LOG2E)


def mod_code(score_mod: Optional[ScoreMod]) -> int:
    """The ``MOD`` constexpr of ``score_mod`` (:data:`NONE` for None)."""
    if score_mod is None:
        return NONE
    if score_mod.kind not in _CODES:
        raise ValueError(f"the Triton kernels do not apply score_mod {score_mod.kind}")
    return _CODES[score_mod.kind]


def mod_arguments(score_mod: Optional[ScoreMod], parameter_grad: bool = False) -> dict:
    """The kernel arguments of ``score_mod`` (None: the plain kernels): ``BIAS``, ``n_bias``,
    ``cap2`` and ``MOD``, and with ``parameter_grad`` (a dQ pass) ``BR``, the power of two at or
    above ``n_bias``."""
    arguments = dict(BIAS=None, n_bias=None, cap2=None, MOD=mod_code(score_mod))
    if score_mod is not None:
        if score_mod.kind == "softcap":
            arguments["cap2"] = score_mod.cap * LOG2E
        else:
            parameter = score_mod.parameter
            arguments["BIAS"] = (parameter.detach().float() * LOG2E).contiguous()
            arguments["n_bias"] = 1 if parameter.dim() == 1 else parameter.shape[1]
    if parameter_grad:
        arguments["BR"] = triton.next_power_of_2(arguments["n_bias"] or 1)
    return arguments


def partial_buffer(args: dict, device: torch.device, n_slot_rows: int, n_rows: int) -> Optional[torch.Tensor]:
    """The float32 buffer the dQ pass stores its parameter-gradient shares in: ``(n_slot_rows,
    cdiv(n_rows, GRANULE), n_bias)``, or None when the modification has no parameter."""
    if args["MOD"] < ALIBI:
        return None
    return torch.zeros(n_slot_rows, math.ceil(n_rows / GRANULE), args["n_bias"], device=device, dtype=torch.float32)


def reduce_partials(partials: torch.Tensor, batch: int, n_heads: int) -> torch.Tensor:
    """``(Hq, n_bias)`` float32: a buffer of :func:`partial_buffer` whose slot rows run over
    ``(batch, head, ...)`` summed over everything but the head, in a fixed order (float64)."""
    return partials.view(batch, n_heads, -1, partials.shape[-1]).double().sum((0, 2)).float()


@triton.jit
def _tanh(x):
    """``tanh(x)`` from one ``exp2`` (saturates to +-1; absolute error ~1e-7)."""
    return 1.0 - 2.0 / (tl.math.exp2(x * _TWO_LOG2E) + 1.0)


@triton.jit
def modify(s, offset, BIAS, head, n_bias, cap2, MOD: tl.constexpr):
    """Base-2 scores ``s`` modified; ``offset = j - i`` of the same shape; ``head`` the query head
    (a scalar, or a column ``(rows, 1)`` when the tile's rows belong to several heads)."""
    if MOD == 1:
        s = _tanh(s / cap2) * cap2
    elif MOD == 2:
        s = s + tl.load(BIAS + head) * offset.to(tl.float32)
    elif MOD == 3:
        s = s + tl.load(BIAS + head * n_bias + tl.minimum(tl.abs(offset), n_bias - 1))
    return s


@triton.jit
def raw_grad(ds, s_mod, cap2, MOD: tl.constexpr):
    """The gradient of the raw scores from ``ds``, that of the modified ones ``s_mod`` (base 2)."""
    if MOD == 1:
        t = s_mod / cap2
        ds = ds * (1.0 - t * t)
    return ds


@triton.jit
def parameter_step(acc, ds, offset, n_bias, BR: tl.constexpr, MOD: tl.constexpr):
    """Add a tile's share of the parameter gradient to ``acc (BR,)`` float32: ``ds`` the gradient
    of the modified scores (natural units, zero on hidden pairs)."""
    if MOD == 2:
        acc += tl.sum(tl.sum(ds * offset.to(tl.float32), 1), 0)
    elif MOD == 3:
        index = tl.minimum(tl.abs(offset), n_bias - 1)
        columns = tl.arange(0, BR)
        # one masked sum per distance the tile holds (one for a tile beyond R - 1)
        for r in range(tl.min(tl.min(index, 1), 0), tl.max(tl.max(index, 1), 0) + 1):
            acc += tl.where(columns == r, tl.sum(tl.sum(tl.where(index == r, ds, 0.0), 1), 0), 0.0)
    return acc


@triton.jit
def store_parameter(DPARAM, slot_row, block, n_granules, acc, n_bias, BM: tl.constexpr, BR: tl.constexpr,
                    MOD: tl.constexpr):
    """Store a dQ program's share ``acc`` for query block ``block`` (of ``BM`` rows) at slot row
    ``slot_row`` of the :func:`partial_buffer` (zeros in its other slots)."""
    if MOD >= 2:
        SUB: tl.constexpr = BM // _GRANULE
        subs = tl.arange(0, SUB)
        columns = tl.arange(0, BR)
        granule = block * SUB + subs
        values = tl.where(subs[:, None] == 0, acc[None, :], 0.0)
        at = (slot_row.to(tl.int64) * n_granules + granule)[:, None] * n_bias + columns[None, :]
        tl.store(DPARAM + at, values, mask=(granule < n_granules)[:, None] & (columns < n_bias)[None, :])
