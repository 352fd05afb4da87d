"""Attention patterns: which keys each query may see.

A pattern is a pure predicate on absolute positions: ``allows(i, j)`` is True when the query at
position ``i`` may attend to the key at position ``j``. Every execution path (dense masks, tile
skipping in the blockwise kernel, block layouts for plots and planners) is derived from that one
definition, so a pattern cannot mean two different things in two places.

Positions follow bottom-right alignment: with ``n_q`` queries and ``n_k`` keys, query row ``r`` sits
at absolute position ``r + (n_k - n_q)`` and key column ``c`` at position ``c``. This makes a causal
pattern correct for KV-cache decoding, where a few new queries see a long cache.

The sparse patterns of Child et al. (2019), :class:`Strided` and :class:`Fixed`, expose their two
parts (``.parts``) so a model can give each head or layer one of them. :class:`BlockSparse` allows
whole blocks of a layout.

Every pattern declares its geometry once, as :attr:`Pattern.pieces`: disjoint :class:`Piece` s of
closed form (a band, residues modulo a stride, causal blocks, summary columns) whose union is the
pattern, or None when it has none; planners run these pieces.
:attr:`Pattern.parts` are the patterns a model may give each head (Strided's and Fixed's two
parts), and what ``auto`` counts as the sparse planner's work.

Patterns whose allowed set is a diagonal band ``lo <= i - j <= hi`` (Full, Causal, SlidingWindow and
their intersections) report it through :meth:`Pattern.band`; kernels use it to skip tiles and to know
which tiles need no element mask without evaluating the predicate.

The package: :mod:`.base` (the :class:`Pattern` base class, band helpers, :class:`Piece`, Union
and Intersection), :mod:`.bands` (Full, Causal, SlidingWindow), :mod:`.sparse_transformer`
(Strided, Fixed and their parts), :mod:`.blocks` (BlockSparse), :mod:`.custom` (Predicate),
:mod:`.documents` (Document, :func:`document_positions`),
:mod:`.compose` (PerHead, Difference, :func:`as_pattern`) and :mod:`.heads` (per-head patterns
and runs). Kernels ask these modules about patterns (bands, pieces, parts, heads); nothing here
imports a kernel.
"""

from .bands import Causal, Full, SlidingWindow
from .base import (
    LATTICE, SUMMARY, Band, Intersection, Pattern, Piece, Union, finite_band, query_key_positions, shared_band,
)
from .blocks import BlockSparse
from .compose import Difference, PerHead, as_pattern
from .custom import Predicate
from .documents import Document, document_positions
from .heads import head_pattern, head_runs
from .sparse_transformer import BlockLocal, Fixed, Periodic, Strided, Summary

__all__ = [
    "Band", "BlockLocal", "BlockSparse", "Causal", "Difference", "Document", "Fixed", "Full", "Intersection", "LATTICE",
    "Pattern", "PerHead", "Periodic", "Piece", "Predicate", "SUMMARY", "SlidingWindow", "Strided", "Summary", "Union",
    "as_pattern", "document_positions", "finite_band", "head_pattern", "head_runs", "query_key_positions", "shared_band",
]
