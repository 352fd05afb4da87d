"""``attention()`` and ``reference_attention()``: validate -> pick a backend -> run, for every pattern.

Conventions: tensors are ``(batch, heads, seq, head_dim)``; ``q`` has ``Hq``
heads and ``k``/``v`` have ``Hkv`` heads with ``Hq % Hkv == 0`` (query head ``h`` uses KV head
``h // (Hq // Hkv)``); query row ``r`` sits at absolute position ``r + Nk - Nq`` unless the call
gives ``q_positions`` / ``k_positions``; the scale defaults
to ``1 / sqrt(head_dim)``; fully masked query rows return zeros and LSE ``-inf`` (with ``sinks``:
zeros and LSE ``sinks[h]``, the sink being the only term of their denominator); softmax statistics
and the LSE are float32 for float16/bfloat16 inputs.

Non-finite inputs follow one rule in every backend: **a row's output depends only on the keys and
values it may see.** A NaN or inf at a position the pattern hides from a row never reaches that
row (nor its gradients); a row that may see one gets whatever its own arithmetic gives (NaN, or
inf) and passes no gradient back.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .backends import BACKENDS, backend_named, make_problem, pick
from .checks import check_sinks
from .kernels.common import keep_visible
from .kernels.sinks import with_sinks
from .kernels.reference import reference_kernel
from .kernels.score_mods import ScoreMod
from .patterns import Pattern

__all__ = ["BACKENDS", "attention", "reference_attention"]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Optional[Pattern] = None,
    *,
    scale: Optional[float] = None,
    backend: str = "auto",
    return_lse: bool = False,
    q_positions: Optional[torch.Tensor] = None,
    k_positions: Optional[torch.Tensor] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    score_mod: Optional[ScoreMod | Callable] = None,
    sinks: Optional[torch.Tensor] = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact scaled dot-product attention restricted to ``pattern``.

    Args:
        q: ``(B, Hq, Nq, D)`` queries.
        k: ``(B, Hkv, Nk, D)`` keys, ``Hq % Hkv == 0`` (MHA ``Hkv == Hq``, MQA ``Hkv == 1``).
        v: ``(B, Hkv, Nk, Dv)`` values.
        pattern: which keys each query may see; ``None`` means :class:`~attnkit.patterns.Full`.
        scale: multiplier of ``q @ k^T``; default ``1 / sqrt(D)``.
        backend: ``"auto"`` (fastest exact choice, see :mod:`attnkit.backends.policy`),
            ``"reference"`` (explicit two-step math), ``"dense"`` (torch SDPA), ``"blockwise"``
            (tiled online softmax, skips empty tiles), ``"sparse"`` (the sparse planner: work in
            proportion to the allowed pairs), ``"triton"`` (Triton GPU kernels; CPU tensors under
            ``TRITON_INTERPRET=1``). See ``attnkit.BACKENDS``.
        return_lse: also return the log-sum-exp of the allowed scaled scores.
        q_positions: ``(Nq,)`` integer absolute positions of the query rows, and
        k_positions: ``(Nk,)`` those of the keys, where the pattern is evaluated (a shard of a
            longer sequence, say). Default bottom-right alignment: keys ``0 .. Nk-1``, queries
            ``Nk-Nq .. Nk-1``; either may be given alone. Taken by reference, dense and
            blockwise.
        key_padding_mask: ``(B, Nk)`` bool, True = a real key: padding keys are hidden from every
            row (batches of sequences of different lengths). Taken by reference and dense.
        score_mod: a change of each score ``s = q . k * scale`` before the softmax, at the
            absolute positions ``i`` (query) and ``j`` (key) and query head ``h``:
            ``attnkit.softcap(c)`` (``c * tanh(s / c)``), ``attnkit.alibi(slopes (Hq,))``
            (``s + slopes[h] * (j - i)``) or ``attnkit.distance_bias(table (Hq, R))``
            (``s + table[h, min(|i - j|, R - 1)]``); slopes and table may require grad. Hidden
            pairs stay hidden. Applied by reference, blockwise and sparse (not on Document
            patterns yet); dense takes alibi and distance_bias, not softcap; triton none yet.
            A Python callable ``fn(s, b, h, i, j)`` (see
            :func:`attnkit.kernels.score_mods.score_callable`) runs on reference and dense only.
        sinks: ``(Hq,)`` attention sinks (as in gpt-oss): one logit per query head that joins
            every row's softmax denominator and contributes no value,
            ``out = sum_j exp(s_j) v_j / (exp(sinks[h]) + sum_j exp(s_j))``; the LSE includes it.
            q's dtype (or float32 for half inputs); differentiable. Taken by every backend.
    Returns:
        ``out (B, Hq, Nq, Dv)`` in q's dtype, or ``(out, lse)`` with lse ``(B, Hq, Nq)`` (float32
        for half inputs, float64 for float64). Rows that see no key (fully masked, or only
        padding) give zeros and lse ``-inf``, or with ``sinks`` zeros and lse ``sinks[h]``.
    Raises:
        TypeError: a non-tensor or non-float input, mixed dtypes, a non-pattern, a bad scale,
            positions that are not integer tensors, a key_padding_mask that is not bool, sinks
            that are not a tensor of q's dtype (or float32 for half q).
        ValueError: rank not 4, batch/head_dim/seq mismatch, ``Hq % Hkv != 0``, mixed devices,
            a per-head pattern whose head count differs from ``Hq``, an unknown backend,
            positions or a padding mask of the wrong shape or device, score mod slopes / table
            whose head count or device differs from q's, sinks not of shape ``(Hq,)`` or on
            another device, a backend that cannot run
            the call (say ``backend="sparse"`` with positions, or ``backend="dense"`` for a
            pattern whose mask would take more than a quarter of the free memory: the message
            names the backends that run it without one).

    A NaN or inf in a key or value reaches only the rows that may see it (see the module
    docstring); the check costs one sum over ``out`` (plus one over ``k`` and ``v`` when
    autograd will differentiate the call) and reruns the call only when it fails.
    """
    problem = make_problem(q, k, v, pattern, scale, return_lse or sinks is not None,
                           q_positions, k_positions, key_padding_mask, score_mod)
    if sinks is not None:
        sinks = check_sinks(sinks, problem.n_q_heads, q.dtype, q.device)
    if problem.positions is None:  # with explicit positions the sequence length is the caller's
        problem.pattern.validate(problem.n_q, problem.n_k)
    if backend == "auto":
        runner = pick(problem)
    else:
        runner = backend_named(backend)
        reason = runner.accepts(problem)
        if reason is not None:
            raise ValueError(f"backend {runner.name!r} cannot run this call: {reason}")
    out, lse = runner.forward(problem, q, k, v)

    def rerun(k_clean: torch.Tensor, v_clean: torch.Tensor) -> tuple:
        return runner.forward(problem, q, k_clean, v_clean)

    out, lse = keep_visible((out, lse), rerun, q, k, v, problem.pattern, problem.positions, problem.key_padding_mask)
    if sinks is not None:  # once, on the result over every key (see kernels/sinks.py)
        out, lse = with_sinks(out, lse, sinks)
    return (out, lse) if return_lse else out


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Optional[Pattern] = None,
    *,
    scale: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed's two steps, explicitly: returns ``(out (B, Hq, Nq, Dv), weights (B, Hq, Nq, Nk))``.

    ``weights`` are the softmax-normalised relevance scores (step 1); ``out = weights @ v``
    (step 2). Half-precision inputs are computed in float32 (weights stay float32, out is cast
    back). The pattern, scale, shape conventions and errors of :func:`attention`; it takes no
    ``q_positions``, ``k_positions``, ``key_padding_mask``, ``backend`` or ``return_lse``.
    """
    problem = make_problem(q, k, v, pattern, scale, False)
    pattern, scale = problem.pattern, problem.scale
    pattern.validate(problem.n_q, problem.n_k)
    result = reference_kernel(q, k, v, pattern, scale)
    out, _, weights = keep_visible(result, lambda k_, v_: reference_kernel(q, k_, v_, pattern, scale), q, k, v, pattern)
    return out, weights
