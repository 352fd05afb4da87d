"""A pattern's pieces and parts are computed once per pattern object (issue 25's follow-up)."""

from __future__ import annotations

import pickle

import pytest
import torch

from attnkit import BlockSparse, Causal, Fixed, PerHead, SlidingWindow, Strided
from attnkit.patterns import Piece


@pytest.mark.parametrize("pattern", [
    SlidingWindow(8), Causal(), Strided(4), Fixed(8, 2), SlidingWindow(3) | Strided(5), SlidingWindow(9) & Causal(),
    Piece(0, 3, segment=4), BlockSparse(torch.eye(4, dtype=torch.bool), 8), PerHead([Causal(), Strided(3)]),
])
def test_pieces_and_parts_are_built_once_and_stay_out_of_equality(pattern, monkeypatch):
    pieces, parts = pattern.pieces, pattern.parts
    built = []
    monkeypatch.setattr(Piece, "__post_init__", lambda self: built.append(self))
    assert pattern.pieces is pieces and pattern.parts is parts and built == []
    if not isinstance(pattern, BlockSparse):  # compared by identity
        assert pattern == pickle.loads(pickle.dumps(pattern)) and hash(pattern) == hash(type(pattern)(**{
            name: getattr(pattern, name) for name in pattern.__dataclass_fields__ if pattern.__dataclass_fields__[name].init}))
    assert "_remembered" not in repr(pattern)


def test_a_remembered_property_stays_read_only():
    pattern = Strided(4)
    with pytest.raises(AttributeError):
        pattern.pieces = ()
