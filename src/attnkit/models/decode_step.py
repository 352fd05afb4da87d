"""The decoding step of :func:`~attnkit.models.generate.stream`: one new token per row through the
model and its caches, with fixed shapes and no value read back to the host.

A step calls the model's unchecked ``logits`` (the tokens come from sampling, in range by
construction; the prompt was checked where it entered). Every tensor a step takes has the same
shape at every position: the tokens ``(B, 1)``, the rotary positions ``(1,)`` or ``(B, 1)``, the
cache position ``(1,)`` and the key mask over all cache positions ``(B, max_len)``, so one
compiled graph serves the whole generation.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


class DecodeStep:
    """Logits ``(B, vocab)`` of one new token per row, ``step(tokens (B,), rope_positions, cache_position)``.

    Args:
        model: a :class:`~attnkit.models.generate.CausalLM`.
        caches: its caches, already holding the prompt.
        key_mask: ``(B, max_len)`` bool over the cache positions (True = a real token), or None
            when no row is padded.
    """

    def __init__(self, model, caches: Sequence[object], key_mask: Optional[torch.Tensor]) -> None:
        self.model, self.caches, self.key_mask = model, list(caches), key_mask

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        return run_step(self.model, self.caches, tokens[:, None], positions, cache_position, self.key_mask)


def run_step(model, caches: list, tokens: torch.Tensor, positions: torch.Tensor, cache_position: torch.Tensor,
             key_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The step itself: ``tokens (B, 1)`` at rotary ``positions`` and ``cache_position (1,)`` ->
    logits ``(B, vocab)``."""
    logits = model.logits(tokens, positions=positions, cache_positions=cache_position, caches=caches,
                          key_mask=key_mask, last_only=True)
    return logits[:, -1]
