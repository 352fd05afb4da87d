"""Score modifications: what happens to a score ``s = q . k * scale`` before the softmax.

A small closed set, one per call (``attention(..., score_mod=...)``), for query ``i``, key ``j``
(absolute positions, the ones the pattern sees) and query head ``h``:

- :func:`softcap` ``(c)``: ``s -> c * tanh(s / c)`` (Gemma 2, Grok);
- :func:`alibi` ``(slopes)``, slopes ``(H,)``: ``s -> s + slopes[h] * (j - i)`` (ALiBi);
- :func:`distance_bias` ``(table)``, table ``(H, R)``: ``s -> s + table[h, min(|i - j|, R - 1)]``
  (a learnable bias by relative distance);
- :func:`score_callable` ``(fn)``: ``s -> fn(s, b, h, i, j)`` on broadcast index tensors (the
  FlexAttention ``score_mod`` idea), for experiments: only the reference and dense backends run it.

Masking is unchanged: a pair the pattern hides stays hidden (the modification is applied to the
scores first, the mask after), and a row with no key gives zeros and LSE ``-inf``. ``slopes`` and
``table`` may require grad; every backend returns their gradients. ``H`` is the number of query
heads. The kernels call :meth:`ScoreMod.scores` on their score tiles and, in hand-written
backward passes, :meth:`ScoreMod.backward` on the tiles' score gradients.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

KINDS = ("softcap", "alibi", "distance_bias", "callable")


class ScoreMod:
    """One score modification (build it with :func:`softcap`, :func:`alibi`,
    :func:`distance_bias` or :func:`score_callable`). ``kind`` is one of :data:`KINDS`; ``cap``
    the soft-cap ``c``; ``parameter`` the slopes ``(H,)`` or table ``(H, R)``; ``fn`` the callable.

    Score tiles are grouped as the kernels hold them: ``(..., Hkv, g, rows, cols)`` with query head
    ``h = kv_head * g + member``; ``q_pos (rows,)`` and ``k_pos (cols,)`` are the absolute
    positions of the tile's rows and columns. Tiles of several units (the sparse planner's) may
    give positions ``(L..., rows)`` and ``(L..., cols)``: the tile is then ``(..., L..., Hkv, g,
    rows, cols)``.
    """

    __slots__ = ("kind", "cap", "parameter", "fn")

    def __init__(self, kind: str, *, cap: Optional[float] = None, parameter: Optional[torch.Tensor] = None,
                 fn: Optional[Callable] = None) -> None:
        self.kind, self.cap, self.parameter, self.fn = kind, cap, parameter, fn

    def __repr__(self) -> str:
        if self.kind == "softcap":
            return f"softcap({self.cap})"
        if self.kind == "callable":
            return f"score_callable({self.fn!r})"
        return f"{self.kind}(tensor of shape {tuple(self.parameter.shape)})"

    def for_heads(self, first: int, stop: int) -> "ScoreMod":
        """The same modification for query heads ``[first, stop)`` alone (a run of heads that
        share a pattern); the parameter's slice stays differentiable."""
        if self.parameter is None or (first, stop) == (0, self.parameter.shape[0]):
            return self
        return ScoreMod(self.kind, parameter=self.parameter[first:stop])

    @property
    def additive(self) -> bool:
        """Whether the modification adds a bias that does not depend on ``s`` (alibi, distance_bias)."""
        return self.kind in ("alibi", "distance_bias")

    def bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor, n_kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
        """The additive bias of alibi / distance_bias, ``(L..., Hkv, Hq // Hkv, rows, cols)`` in
        ``dtype`` for positions ``(L..., rows)`` and ``(L..., cols)``, differentiable in the
        parameter."""
        parameter = self.parameter.to(dtype)
        grouped = parameter.unflatten(0, (n_kv_heads, -1))  # (Hkv, g) or (Hkv, g, R)
        offset = k_pos.unsqueeze(-2) - q_pos.unsqueeze(-1)  # (L..., rows, cols): j - i
        if self.kind == "alibi":
            return grouped[..., None, None] * offset.unsqueeze(-3).unsqueeze(-3).to(dtype)
        index = offset.abs().clamp_(max=parameter.shape[1] - 1)
        units = offset.dim() - 2
        return grouped[..., index].movedim((0, 1), (units, units + 1))  # (Hkv, g, L..., .) -> (L..., Hkv, g, .)

    def scores(self, raw: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, unit: float = 1.0) -> torch.Tensor:
        """The modified scores of a tile of ``raw`` scores (a new tensor). ``unit``: the tile's
        scores are ``s * unit`` (``log2(e)`` for kernels that take exp2), and so are the results.
        Differentiable by autograd (in the parameter, and in ``raw``)."""
        if self.kind == "softcap":
            cap = self.cap * unit
            return torch.tanh(raw / cap) * cap
        if self.kind == "callable":
            return self._called(raw / unit if unit != 1.0 else raw, q_pos, k_pos) * unit
        bias = self.bias(q_pos, k_pos, raw.shape[-4], raw.dtype)
        return raw + (bias * unit if unit != 1.0 else bias)

    def _called(self, raw: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        n_kv_heads, groups = raw.shape[-4], raw.shape[-3]
        batch = torch.arange(raw.shape[0] if raw.dim() > 4 else 1, device=raw.device)
        heads = torch.arange(n_kv_heads * groups, device=raw.device).view(n_kv_heads, groups, 1, 1)
        result = self.fn(raw, batch.view(-1, 1, 1, 1, 1), heads, q_pos.view(-1, 1), k_pos.view(1, -1))
        if not isinstance(result, torch.Tensor) or result.shape != raw.shape:
            raise ValueError(
                f"score_mod callable must return a tensor of the scores' shape {tuple(raw.shape)}, "
                f"got {tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__}"
            )
        return result

    def backward(self, raw: torch.Tensor, d_mod: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                 unit: float = 1.0) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(d_raw, d_parameter)`` of a tile: ``d_mod`` is the gradient of the loss with respect
        to the modified scores (natural units, zero on hidden pairs), ``raw`` the tile's raw scores
        (times ``unit``, finite: taken before masking). ``d_raw`` is in natural units, like
        ``d_mod``; ``d_parameter`` is shaped like the parameter (float of ``d_mod``'s dtype), or
        None when the mod has none."""
        if self.kind == "softcap":
            slope = 1.0 - torch.tanh(raw / (self.cap * unit)).square_()
            return d_mod * slope, None
        if self.kind == "callable":
            with torch.enable_grad():
                raw = raw.detach().requires_grad_()
                modified = self._called(raw / unit if unit != 1.0 else raw, q_pos, k_pos)
                (d_raw,) = torch.autograd.grad(modified, raw, d_mod)
            return d_raw * unit, None
        return d_mod, self.parameter_grad(d_mod, q_pos, k_pos)

    def parameter_grad(self, d_mod: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """The gradient of slopes / table from ``d_mod (..., Hkv, g, rows, cols)``, the gradient
        of the modified scores of a tile (summed over leading batch dimensions)."""
        per_head = d_mod.reshape(-1, d_mod.shape[-4] * d_mod.shape[-3], *d_mod.shape[-2:]).sum(0)  # (Hq, rows, cols)
        offset = k_pos[None, :] - q_pos[:, None]
        if self.kind == "alibi":
            return (per_head * offset.to(per_head.dtype)).sum((-1, -2))
        index = offset.abs().clamp_(max=self.parameter.shape[1] - 1).flatten()
        grad = per_head.new_zeros(self.parameter.shape)
        return grad.index_add_(1, index, per_head.flatten(1))


def softcap(cap: float) -> ScoreMod:
    """Logit soft-capping ``s -> cap * tanh(s / cap)`` (Gemma 2 uses 50 in attention).
    Raises TypeError when ``cap`` is not a real number, ValueError when it is not finite or
    not positive."""
    if isinstance(cap, bool) or not isinstance(cap, (int, float)):
        raise TypeError(f"softcap: cap must be a real number, got {type(cap).__name__}")
    if not math.isfinite(cap) or cap <= 0:
        raise ValueError(f"softcap: cap must be finite and positive, got {cap}")
    return ScoreMod("softcap", cap=float(cap))


def _check_parameter(name: str, value, dims: int, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor {what}, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.dim() != dims or value.numel() == 0:
        raise ValueError(f"{name} must be a non-empty tensor {what}, got shape {tuple(value.shape)}")
    return value


def alibi(slopes: torch.Tensor) -> ScoreMod:
    """ALiBi: ``s -> s + slopes[h] * (j - i)`` with ``slopes (H,)`` one slope per query head
    (may require grad). Raises TypeError / ValueError naming ``slopes`` for a non-tensor, a
    non-float dtype or a shape that is not ``(H,)``; its head count and device are checked
    against ``q`` by :func:`attnkit.attention`."""
    return ScoreMod("alibi", parameter=_check_parameter("slopes", slopes, 1, "of shape (H,)"))


def distance_bias(table: torch.Tensor) -> ScoreMod:
    """A bias by relative distance: ``s -> s + table[h, min(|i - j|, R - 1)]`` with
    ``table (H, R)`` (may require grad; distances from ``R - 1`` on share the last column).
    Raises TypeError / ValueError naming ``table`` as :func:`alibi` does for ``slopes``."""
    return ScoreMod("distance_bias", parameter=_check_parameter("table", table, 2, "of shape (H, R)"))


def score_callable(fn: Callable) -> ScoreMod:
    """A Python score modification ``fn(s, b, h, i, j) -> s'`` on broadcast tensors: ``s`` the
    scores ``(B, Hkv, g, Nq, Nk)``, ``b (B, 1, 1, 1, 1)``, ``h (Hkv, g, 1, 1)`` the query head,
    ``i (Nq, 1)`` and ``j (1, Nk)`` the absolute positions; it must return a tensor of ``s``'s
    shape and be differentiable by autograd. For experiments: only the reference and dense
    backends run it (a plain callable passed as ``score_mod`` is wrapped by this)."""
    if not callable(fn):
        raise TypeError(f"score_mod must be a ScoreMod or a callable, got {type(fn).__name__}")
    return ScoreMod("callable", fn=fn)


def as_score_mod(score_mod) -> Optional[ScoreMod]:
    """``score_mod`` as a :class:`ScoreMod` (a callable is wrapped by :func:`score_callable`);
    None stays None."""
    if score_mod is None or isinstance(score_mod, ScoreMod):
        return score_mod
    return score_callable(score_mod)


def check_score_mod(score_mod, n_q_heads: int, device: torch.device) -> Optional[ScoreMod]:
    """``score_mod`` checked against the call's query heads and device: ValueError naming
    ``slopes`` / ``table`` when its head count or device differs from ``q``'s."""
    score_mod = as_score_mod(score_mod)
    if score_mod is None or score_mod.parameter is None:
        return score_mod
    name = "slopes" if score_mod.kind == "alibi" else "table"
    parameter = score_mod.parameter
    if parameter.shape[0] != n_q_heads:
        raise ValueError(f"{name} must have one entry per query head ({n_q_heads}), got shape {tuple(parameter.shape)}")
    if parameter.device != device:
        raise ValueError(f"{name} is on {parameter.device} but q is on {device}")
    return score_mod


__all__ = ["KINDS", "ScoreMod", "alibi", "as_score_mod", "check_score_mod", "distance_bias", "score_callable", "softcap"]
