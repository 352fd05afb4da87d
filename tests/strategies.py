"""Hypothesis strategies for attention problems: shapes, GQA groups, patterns and memory layouts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from attnkit import Causal, Full, PerHead, Predicate, SlidingWindow
from attnkit.patterns import Pattern


def _every_third(i, j):
    return ((i - j) % 3 == 0) & (j <= i)


def _future_only(i, j):
    return j > i


def _checkerboard(i, j):
    return (i + j) % 2 == 0


def _even_rows_causal(i, j):  # odd query rows see nothing: fully masked rows
    return (i % 2 == 0) & (j <= i)


PREDICATES = [_every_third, _future_only, _checkerboard, _even_rows_causal]


@st.composite
def simple_patterns(draw, max_window: int = 40) -> Pattern:
    kind = draw(st.sampled_from(["full", "causal", "window", "predicate"]))
    if kind == "full":
        return Full()
    if kind == "causal":
        return Causal()
    if kind == "window":
        return SlidingWindow(draw(st.integers(1, max_window)), causal=draw(st.booleans()))
    return Predicate(draw(st.sampled_from(PREDICATES)))


@st.composite
def patterns(draw, n_q_heads: int) -> Pattern:
    kind = draw(st.sampled_from(["simple", "simple", "union", "intersection", "per_head"]))
    if kind == "simple":
        return draw(simple_patterns())
    if kind == "union":
        return draw(simple_patterns()) | draw(simple_patterns())
    if kind == "intersection":
        return draw(simple_patterns()) & draw(simple_patterns())
    return PerHead([draw(simple_patterns()) for _ in range(n_q_heads)])


LAYOUTS = ("contiguous", "transposed", "sliced", "rows", "seq_major", "expanded")
"""How an input is laid out in memory (see :func:`arrange`); values are what counts, not strides."""


def arrange(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A differentiable view of ``t (B, H, N, D)`` laid out as ``layout``:

    - ``transposed``: the head dimension is not unit-stride (stored as ``(B, H, D, N)``);
    - ``sliced``: every other element of a buffer whose other elements are NaN (head stride 2);
    - ``rows``: every other row of a buffer whose other rows are NaN (sequence stride ``2 D``);
    - ``seq_major``: stored as ``(B, N, H, D)``, as a model's projections give it;
    - ``expanded``: stride 0 along the heads (or batch, or sequence): the values of head 0 for
      every head, so the values differ from ``t``'s but the view is what a kernel sees.
    NaN in the buffers means a kernel that reads outside the view cannot pass.
    """
    if layout == "contiguous":
        return t
    if layout == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":
        return torch.stack((t, torch.full_like(t, float("nan"))), dim=-1).flatten(-2)[..., ::2]
    if layout == "rows":
        return torch.stack((t, torch.full_like(t, float("nan"))), dim=-2).flatten(-3, -2)[..., ::2, :]
    if layout == "seq_major":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "expanded":
        dim = next((d for d in (1, 0, 2) if t.shape[d] > 1), 1)
        return t.narrow(dim, 0, 1).expand(t.shape)
    raise ValueError(f"unknown layout {layout!r}")


@dataclass
class Problem:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    pattern: Pattern
    layouts: tuple[str, str, str] = ("contiguous",) * 3

    def arranged(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        """``q, k, v`` (e.g. leaves of this problem's tensors) in this problem's layouts."""
        return [arrange(t, layout) for t, layout in zip((q, k, v), self.layouts)]

    def describe(self) -> str:
        return (
            f"q {tuple(self.q.shape)} k {tuple(self.k.shape)} v {tuple(self.v.shape)} {self.pattern!r} "
            f"layouts {self.layouts}"
        )


@st.composite
def problems(draw, max_len: int = 200, max_head_dim: int = 128, dtype=torch.float64) -> Problem:
    batch = draw(st.integers(1, 3))
    n_kv_heads = draw(st.integers(1, 4))
    groups = draw(st.integers(1, 3))
    n_k = draw(st.integers(1, max_len))
    # Mostly Nq <= Nk (decoding, chunked prefill); sometimes Nq > Nk, whose first rows see no key.
    n_q = draw(st.one_of(st.just(n_k), st.integers(1, n_k), st.integers(1, max_len)))
    head_dim = draw(st.one_of(st.integers(1, 16), st.sampled_from([32, 64, max_head_dim])))
    value_dim = draw(st.one_of(st.just(head_dim), st.integers(1, 16)))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    n_q_heads = n_kv_heads * groups
    q = torch.randn(batch, n_q_heads, n_q, head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, n_kv_heads, n_k, head_dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, n_kv_heads, n_k, value_dim, generator=gen, dtype=torch.float64)
    layouts = tuple(draw(st.sampled_from(LAYOUTS)) for _ in range(3))
    return Problem(q.to(dtype), k.to(dtype), v.to(dtype), draw(patterns(n_q_heads)), layouts)
