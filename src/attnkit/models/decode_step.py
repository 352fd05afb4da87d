"""The decoding step of :func:`~attnkit.models.generate.stream`: one new token per row through the
model and its caches, with fixed shapes and no value read back to the host.

A step calls the model's ``forward_unchecked`` (the tokens come from sampling, in range by
construction; the prompt was checked where it entered). Every tensor a step takes has the same
shape at every position: the tokens ``(B, 1)``, the rotary positions ``(1,)`` or ``(B, 1)``, the
cache position ``(1,)`` and the key mask over all cache positions ``(B, max_len)``, so one
compiled graph serves the whole generation.

Compiling (``compile=True``) runs the step through ``torch.compile``: on a CPU, inductor turns the
whole step (every layer, the caches' writes, the attention, the norms) into generated C++ around
the matrix products; on a GPU, ``mode="reduce-overhead"`` also records it as a CUDA graph, which
the static caches make possible (their buffers never move, and the step reads nothing back). The
first compiled call pays for the compilation (minutes for a 30-layer model on a loaded 2-core CPU;
the benchmark of ``attnkit bench --case decode`` reports it as its warm-up) and compiles again for
every new cache (every ``generate`` call). When compilation fails (no C++ compiler, an operation
inductor cannot trace), the step says so once on stderr and runs uncompiled, with the same results.

A GGUF quantized Llama or Gemma 3 model decoding one unpadded row on the CPU takes the native step
instead (``native=True``, the default): :mod:`attnkit.models.native_step` runs the whole decoder for
the token in one C call, on the same caches, with the same logits up to float32 rounding. Where
it does not apply (another model, a batch, padding, no native library, ``ATTNKIT_NATIVE=0``) or
with ``native=False``, the torch step (compiled or not, as above) runs.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

import torch


class DecodeStep:
    """Logits ``(B, vocab)`` of one new token per row, ``step(tokens (B,), rope_positions, cache_position)``.

    Args:
        model: a :class:`~attnkit.models.generate.CausalLM`.
        caches: its caches, already holding the prompt.
        key_mask: ``(B, max_len)`` bool over the cache positions (True = a real token), or None
            when no row is padded.
        compile: run the torch step through ``torch.compile`` (falling back to the plain step when
            that fails on the first call); unused when the native step runs.
        native: use the native step of :mod:`attnkit.models.native_step` where it applies (then
            ``self.native`` is set).
    """

    def __init__(self, model, caches: Sequence[object], key_mask: Optional[torch.Tensor], *,
                 compile: bool = False, native: bool = True) -> None:
        self.model, self.caches, self.key_mask = model, list(caches), key_mask
        self.compiled = self.native = None
        if native:
            from .native_step import NativeStepUnsupported, native_step

            try:
                self.native = native_step(model, self.caches, key_mask)
            except NativeStepUnsupported:
                pass  # the torch step below
        if compile and self.native is None:
            mode = "reduce-overhead" if model.device.type == "cuda" else None
            self.compiled = torch.compile(run_step, dynamic=False, mode=mode)
        self._first = True

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        if self.native is not None:
            return self.native(tokens, positions, cache_position)
        args = (self.model, self.caches, tokens[:, None], positions, cache_position, self.key_mask)
        if self.compiled is None:
            return run_step(*args)
        if not self._first:
            return self.compiled(*args)
        self._first = False
        try:
            return self.compiled(*args)  # compiles, then runs
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the plain step computes the same
            # (a step writes its keys and values by position, so running it again is harmless)
            reason = (str(exc).strip().splitlines() or [""])[0][:160]
            print(f"attnkit: note: the decoding step did not compile ({type(exc).__name__}: {reason}); "
                  "running it uncompiled", file=sys.stderr)
            self.compiled = None
            return run_step(*args)


def run_step(model, caches: list, tokens: torch.Tensor, positions: torch.Tensor, cache_position: torch.Tensor,
             key_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The step itself: ``tokens (B, 1)`` at rotary ``positions`` and ``cache_position (1,)`` ->
    logits ``(B, vocab)``."""
    logits = model.forward_unchecked(tokens, positions=positions, cache_positions=cache_position, caches=caches,
                          key_mask=key_mask, last_only=True)
    return logits[:, -1]
