"""What every backend is: the :class:`Problem` one call poses, and the :class:`Backend` interface.

A backend is an object with a ``name`` and four methods: :meth:`~Backend.accepts` (can it run
this problem, else why not), :meth:`~Backend.cost` (its estimated work, which ``auto`` compares),
:meth:`~Backend.forward` (``(out, lse)``) and :meth:`~Backend.grad_share` (its share of the
gradients when its keys are one part of a larger key set whose merged LSE is known: what ring
attention and merged plans need). :mod:`.registry` lists the backends; :mod:`.policy` picks one.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch

from ..checks import check_inputs, check_key_padding_mask, check_positions, check_scale
from ..kernels.blockwise import Positions, blockwise_grads
from ..kernels.common import allowed_mask, kv_groups
from ..kernels.reference import explicit_grads
from ..kernels.score_mods import ScoreMod, check_score_mod
from ..patterns import Pattern, as_pattern, query_key_positions

class Grads(NamedTuple):
    """What :meth:`Backend.grad_share` returns: ``dq (B, Hq, Nq, D)``, ``dk (B, Hkv, Nk, D)``,
    ``dv (B, Hkv, Nk, Dv)``, and ``params``: the gradients of the call's parameters other than
    q, k and v, in the order of :meth:`Problem.parameters` (empty when it has none). Like the
    others, each is this key part's share: shares of disjoint parts sum to the gradient."""

    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor
    params: tuple[torch.Tensor, ...] = ()


@dataclass(eq=False, slots=True)
class Problem:
    """One attention call, described by sizes and settings (no tensor values).

    ``positions`` is ``(q_pos (Nq,), k_pos (Nk,))`` int64 when the caller gave absolute positions,
    None for bottom-right alignment. ``key_padding_mask`` is ``(B, Nk)`` bool, True = a real key,
    or None. ``native_band`` says whether bands run the native band kernel: None lets the sparse
    backend decide (:func:`~.sparse.native_bands`, what :func:`attnkit.attention` does), True or
    False is taken as given (what-if questions such as :func:`~.policy.choose_backend`). ``memo`` holds facts the backends derive
    from the pattern (see :mod:`.facts`), so that ``auto`` derives each once per call.
    ``score_mod`` is the call's score modification (:mod:`attnkit.kernels.score_mods`), or None.
    """

    pattern: Pattern
    n_q: int
    n_k: int
    n_q_heads: int = 1
    head_dim: int = 64
    value_dim: int = 64
    batch: int = 1
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    scale: float = 1.0
    need_lse: bool = False
    positions: Optional[Positions] = None
    key_padding_mask: Optional[torch.Tensor] = None
    native_band: Optional[bool] = None
    memo: Optional[dict] = field(default=None, repr=False)
    score_mod: Optional[ScoreMod] = None

    @property
    def square(self) -> int:
        """Score entries of the whole ``Nq x Nk`` square over all query heads, per batch entry."""
        return self.n_q * self.n_k * self.n_q_heads

    def parameters(self) -> tuple[torch.Tensor, ...]:
        """The call's tensors other than q, k, v that get gradients (the score mod's slopes or
        table), in the order of :attr:`Grads.params`."""
        if self.score_mod is None or self.score_mod.parameter is None:
            return ()
        return (self.score_mod.parameter,)


def check_pattern(pattern: Optional[Pattern], n_q_heads: int) -> Pattern:
    """``pattern`` as a :class:`Pattern` (None = Full); ValueError when it is per-head for another
    number of heads than q has, TypeError when it is not a pattern."""
    pattern = as_pattern(pattern)
    if pattern.n_heads is not None and pattern.n_heads != n_q_heads:
        raise ValueError(
            f"pattern is per-head for {pattern.n_heads} heads, but q has {n_q_heads} heads"
        )
    return pattern


def make_problem(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Optional[Pattern],
    scale: Optional[float],
    need_lse: bool,
    q_positions: Optional[torch.Tensor] = None,
    k_positions: Optional[torch.Tensor] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    score_mod=None,
) -> Problem:
    """Validate one call's arguments and describe it. A missing one of ``q_positions`` and
    ``k_positions`` gets its bottom-right default. Raises TypeError / ValueError naming the
    argument at fault (see :func:`attnkit.attention`)."""
    check_inputs(q, k, v)
    n_q, n_k = q.shape[2], k.shape[2]
    scale = check_scale(scale, q.shape[-1])
    problem = Problem(
        check_pattern(pattern, q.shape[1]), n_q, n_k, q.shape[1], q.shape[3], v.shape[3],
        q.shape[0], q.device, q.dtype, scale, need_lse,
        score_mod=check_score_mod(score_mod, q.shape[1], q.device),
    )
    if q_positions is not None or k_positions is not None:
        default_q, default_k = query_key_positions(n_q, n_k, q.device)
        problem.positions = (
            default_q if q_positions is None else check_positions("q_positions", q_positions, n_q, q.device),
            default_k if k_positions is None else check_positions("k_positions", k_positions, n_k, q.device),
        )
    if key_padding_mask is not None:
        problem.key_padding_mask = check_key_padding_mask(key_padding_mask, q.shape[0], n_k, q.device)
    return problem


class Backend(ABC):
    """One way to compute attention. Subclasses set ``name`` and ``description`` and implement
    :meth:`cost`, :meth:`forward` and :meth:`grad_share`; they declare whether they take explicit
    positions, a key padding mask and which score mods, and may refuse more in :meth:`accepts`."""

    name: str = ""
    description: str = ""
    takes_positions: bool = False
    takes_padding: bool = False
    score_mods: tuple[str, ...] = ()
    """The kinds of score mod it applies (:data:`~attnkit.kernels.score_mods.KINDS`)."""

    def accepts(self, problem: Problem) -> Optional[str]:
        """None when this backend can run ``problem``, else why not (one clause, no period)."""
        return self.takes_arguments(problem)

    def takes_arguments(self, problem: Problem) -> Optional[str]:
        """None unless the call gives positions, a padding mask or a score mod this backend does
        not take."""
        kind = None if problem.score_mod is None else problem.score_mod.kind
        if kind == "callable" and kind not in self.score_mods:
            return "a Python score_mod callable runs only on backend='reference' or 'dense'"
        if kind is not None and kind not in self.score_mods:
            return f"it does not apply score_mod {kind}"
        if problem.positions is not None and not self.takes_positions:
            return "it takes no explicit q_positions / k_positions"
        if problem.key_padding_mask is not None and not self.takes_padding:
            return "it takes no key_padding_mask"
        return None

    def cost(self, problem: Problem) -> float:
        """Estimated work in score entries (see :mod:`.policy`); ``math.inf`` when this backend
        runs the problem but is never the fastest choice for it. A backend that does not override
        this is never picked by cost."""
        return math.inf

    @abstractmethod
    def forward(
        self, problem: Problem, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(out (B, Hq, Nq, Dv), lse (B, Hq, Nq))`` of validated inputs; lse may be None when
        ``problem.need_lse`` is False. Differentiable in q, k, v and in ``problem.parameters()``."""

    @abstractmethod
    def grad_share(
        self,
        problem: Problem,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        d_out: torch.Tensor,
        d_lse: Optional[torch.Tensor],
    ) -> Grads:
        """The share of ``(dq, dk, dv)`` (and of the parameters' gradients, :class:`Grads`) that
        flows through the keys ``k``/``v`` when they are one part of a larger key set: ``out
        (B, Hq, Nq, Dv)`` and ``lse (B, Hq, Nq)`` are the results over the whole key set,
        ``d_out`` and ``d_lse`` (None = zero) their gradients. Summing the shares of disjoint
        parts gives the exact gradient."""


def default_positions(problem: Problem) -> Positions:
    """``problem.positions``, or the bottom-right ones when the caller gave none."""
    if problem.positions is not None:
        return problem.positions
    return query_key_positions(problem.n_q, problem.n_k, problem.device)


def tiled_grad_share(
    problem: Problem,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    d_out: torch.Tensor,
    d_lse: Optional[torch.Tensor],
) -> Grads:
    """:meth:`Backend.grad_share` by the blockwise kernel's backward (exact for any pattern,
    positions and padding, and it takes the LSE gradient), for backends whose own backward does not."""
    d_lse = torch.zeros_like(lse) if d_lse is None else d_lse
    *grads, d_parameter = blockwise_grads(
        q, k, v, out, lse, d_out, d_lse, problem.pattern, problem.scale, default_positions(problem),
        key_padding_mask=problem.key_padding_mask, score_mod=problem.score_mod,
    )
    return with_parameters(problem, grads, d_parameter)


def with_parameters(problem: Problem, grads, d_parameter: Optional[torch.Tensor]) -> Grads:
    """:class:`Grads` of ``grads = (dq, dk, dv)`` and the score mod's parameter gradient (zeros
    when the kernel gave None for a problem that has a parameter)."""
    params = problem.parameters()
    if params and d_parameter is None:
        d_parameter = torch.zeros_like(params[0])
    return Grads(*grads, (d_parameter,) if params else ())


def explicit_grad_share(
    problem: Problem,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    d_out: torch.Tensor,
    d_lse: Optional[torch.Tensor],
) -> Grads:
    """:meth:`Backend.grad_share` by the explicit formula over the call's ``(Nq, Nk)`` mask
    (pattern, positions and padding), for the backends that materialise the square anyway
    (reference, dense: SDPA's own backward cannot be given a merged LSE)."""
    allowed = allowed_mask(problem.pattern, q.shape[2], k.shape[2], q.device, kv_groups(q, k),
                           problem.positions, problem.key_padding_mask)
    *grads, d_parameter = explicit_grads(q, k, v, out, lse, d_out, d_lse, allowed, problem.scale,
                                         problem.score_mod, problem.positions)
    return with_parameters(problem, grads, d_parameter)
