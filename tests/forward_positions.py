"""Test helper: the positions a model's forward calls are given."""

from __future__ import annotations

from torch import nn


def record_positions(model: nn.Module) -> list:
    """Wrap ``model.forward`` so that each call appends its ``positions`` (as a list) to the
    returned list; a call without positions fails the test with a KeyError."""
    seen = []
    forward = model.forward

    def recording_forward(tokens, **kwargs):
        seen.append(kwargs["positions"].tolist())
        return forward(tokens, **kwargs)

    model.forward = recording_forward
    return seen
