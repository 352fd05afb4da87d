"""Test helper: the positions a model's forward calls are given."""

from __future__ import annotations

from torch import nn


def record_positions(model: nn.Module) -> list:
    """Wrap ``model.forward`` and ``model.forward_unchecked`` (what each decoding step of
    ``generate`` calls) so that each outermost call appends its ``positions`` (as a list) to the
    returned list; a call without positions fails the test with a KeyError."""
    seen = []
    depth = 0  # forward and forward_unchecked call each other: record the caller's call only

    def recording(method):
        def call(tokens, **kwargs):
            nonlocal depth
            if depth == 0:
                seen.append(kwargs["positions"].tolist())
            depth += 1
            try:
                return method(tokens, **kwargs)
            finally:
                depth -= 1
        return call

    for name in ("forward", "forward_unchecked"):
        if hasattr(model, name):
            setattr(model, name, recording(getattr(model, name)))
    return seen
