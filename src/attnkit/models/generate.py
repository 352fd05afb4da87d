"""Text generation with a static KV cache: one prefill pass over the prompts, then one token per step.

Prompts of different lengths are left-padded to the longest; each row's positions start at 0 at
its first real token and a key mask hides the padding, so a row generates exactly what it would
generate alone. :func:`stream` gives every forward call it makes its positions explicitly, so
generation never relies on the default that attnkit's attention layers take when a caller passes
none (the next positions after the cache's length); that default remains for direct callers.

What a model must offer is written down as :class:`CausalLM`; :class:`~attnkit.models.llama.Llama`
is one. Sampling: greedy (``temperature = 0``), or softmax at ``temperature`` restricted to
the ``top_k`` most likely tokens and to the smallest set whose probability reaches ``top_p``,
drawn from a ``torch.Generator`` seeded with ``seed``.
"""

from __future__ import annotations

import math
import operator
from numbers import Real
from typing import Iterable, Iterator, Optional, Protocol, Sequence, runtime_checkable

import torch

from .decode_step import DecodeStep


class DecoderConfig(Protocol):
    """The config fields generation reads."""

    @property
    def vocab_size(self) -> int:
        """Token ids lie in ``[0, vocab_size)``."""

    @property
    def max_position_embeddings(self) -> int:
        """The most positions (prompt + new tokens) the model may see; the caches hold this many."""

    @property
    def eos_token_ids(self) -> Sequence[int]:
        """The tokens that end a row when ``stop_tokens`` is not given."""


@runtime_checkable
class CausalLM(Protocol):
    """What :func:`generate` and :func:`stream` need of a model.

    - ``config``: a :class:`DecoderConfig`.
    - ``device``: where the token ids, positions and masks are put.
    - ``make_caches(batch, max_len)``: fresh, empty key/value caches (one per layer, whatever the
      model keeps) able to hold ``max_len`` positions of ``batch`` rows.
    - ``model(tokens, *, positions, cache_positions, caches, key_mask, last_only=True)``: ``tokens
      (B, N)`` int64 sit at rotary ``positions`` (``(N,)`` when every row agrees, else ``(B, N)``);
      their keys and values go into ``caches`` at ``cache_positions (N,)`` (the cache protocol of
      :mod:`attnkit.nn.kv_cache`); ``key_mask`` ``(B, max_len)`` over the cache positions (True =
      a real token) is None when no row is padded. Returns logits ``(B, 1, vocab)`` of the last
      position. This call checks its input (the prompt enters here).
    - ``model.forward_unchecked(...)``: the same without input checks and without reading
      anything back to the host; each decoding step calls it (:mod:`attnkit.models.decode_step`).
    """

    @property
    def config(self) -> DecoderConfig: ...

    @property
    def device(self) -> torch.device: ...

    def make_caches(self, batch: int, max_len: int) -> Sequence[object]: ...

    def __call__(self, tokens: torch.Tensor, *, positions: torch.Tensor, cache_positions: torch.Tensor,
                 caches: Sequence[object], key_mask: Optional[torch.Tensor], last_only: bool) -> torch.Tensor: ...

    def forward_unchecked(self, tokens: torch.Tensor, *, positions: torch.Tensor, cache_positions: torch.Tensor,
                          caches: Sequence[object], key_mask: Optional[torch.Tensor],
                          last_only: bool) -> torch.Tensor: ...


def _check_options(max_new_tokens, temperature, top_k, top_p, seed) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, Real) or not 0 <= temperature < math.inf:
        raise ValueError(f"generate: temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0):
        raise ValueError(f"generate: top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, Real) or not 0 < top_p <= 1):
        raise ValueError(f"generate: top_p must be in (0, 1] or None, got {top_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
        raise ValueError(f"generate: seed must be an integer in [0, 2**64) or None, got {seed!r}")


def _stop_list(stop_tokens) -> list:
    if isinstance(stop_tokens, (str, bytes)) or not isinstance(stop_tokens, Iterable):
        raise ValueError(
            f"generate: stop_tokens must be a sequence of token ids (e.g. [2]), got {type(stop_tokens).__name__} "
            f"{stop_tokens!r}"
        )
    return [_token_id(t) for t in stop_tokens]


def _token_id(value):
    """``value`` as a Python int when it is an integer of any kind (numpy, a one-element integer
    tensor), so ``stop_tokens=torch.tensor([2])`` means ``[2]``; other values are returned as they
    are, for the caller's check to name."""
    if isinstance(value, (bool, int)):
        return value
    try:
        return operator.index(value)
    except TypeError:
        return value


def _check_finite(top: torch.Tensor, step: int) -> None:
    """Raise when a row's largest logit ``top (B,)`` is not finite: a NaN logit (the maximum
    propagates it), a +inf one, or a row of -inf. Either makes argmax and the softmax meaningless."""
    if not bool(torch.isfinite(top).all()):
        where = "the prompt" if step == 0 else f"decode step {step}"
        raise ValueError(f"generate: the model produced NaN, +inf or all -inf logits after {where}; its weights or inputs hold non-finite values")


def _as_rows(tokens, vocab_size: Optional[int] = None) -> list[list[int]]:
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 2 or tokens.is_floating_point():
            raise ValueError(f"generate: tokens must be an integer tensor (batch, seq), got {tokens.dtype} {tuple(tokens.shape)}")
        rows = tokens.tolist()
    else:
        rows = [[_token_id(t) for t in row] for row in tokens]
    if not rows:
        raise ValueError("generate: tokens holds no prompt")
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"generate: prompt {i} is empty")
        if any(isinstance(t, bool) or not isinstance(t, int) for t in row):
            raise ValueError(f"generate: prompt {i} must hold integer token ids")
        if vocab_size is not None and not 0 <= min(row) <= max(row) < vocab_size:
            raise ValueError(f"generate: token ids must lie in [0, {vocab_size}), prompt {i} holds [{min(row)}, {max(row)}]")
    return rows


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Next tokens ``(B,)`` from ``logits (B, vocab)``: argmax when ``temperature == 0``, else a draw
    from the temperature softmax limited to the ``top_k`` best and the ``top_p`` nucleus (the most
    likely token always stays eligible). Raises ValueError when a row holds a NaN or +inf logit
    or only -inf ones."""
    token, top = sample_and_top(logits, temperature, top_k, top_p, generator)
    if not bool(torch.isfinite(top).all()):
        raise ValueError("sample: logits hold NaN, +inf or a row of only -inf values")
    return token


def sample_and_top(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample` without its check, and each row's largest logit ``(B,)`` found on the way
    (NaN when the row holds one; the token is then meaningless): :func:`stream` checks it once
    per step, at no extra pass over the vocabulary."""
    if temperature == 0:
        top, token = logits.max(-1)
        return token, top
    # Shift the maximum to 0 before dividing, in float64: a tiny temperature then sends the other
    # logits to -inf (a greedy choice) rather than everything to inf (NaN probabilities).
    logits = logits.double()
    top = logits.amax(-1, keepdim=True)
    logits = (logits - top) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    if not bool(torch.isfinite(top).all()):  # NaN probabilities would make multinomial raise its own error
        return torch.zeros(top.shape[0], dtype=torch.long, device=top.device), top[:, 0]
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1), top[:, 0]


@torch.no_grad()
def stream(
    model: CausalLM,
    tokens,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    seed: Optional[int] = None,
    stop_tokens: Optional[Sequence[int]] = None,
    compile: bool = False,
    native: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, ``(B,)`` int64 per step; the first yield follows the
    prefill. A row that has produced a stop token repeats it; the stream ends when every row has
    stopped or after ``max_new_tokens`` steps. Arguments as :func:`generate`."""
    _check_options(max_new_tokens, temperature, top_k, top_p, seed)
    config = model.config
    rows = _as_rows(tokens, config.vocab_size)
    stops = _stop_list(config.eos_token_ids if stop_tokens is None else stop_tokens)
    bad = [t for t in stops if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < config.vocab_size]
    if bad:
        raise ValueError(f"generate: stop_tokens must be token ids in [0, {config.vocab_size}), got {bad[0]!r}")
    stops = torch.tensor(stops, dtype=torch.long)
    device = model.device
    lengths = torch.tensor([len(r) for r in rows])
    prompt_len = int(lengths.max())
    total = prompt_len + max_new_tokens
    if total > config.max_position_embeddings:
        raise ValueError(
            f"generate: prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's max_position_embeddings ({config.max_position_embeddings})"
        )
    if max_new_tokens == 0:
        return
    pads = prompt_len - lengths
    batch = torch.zeros(len(rows), prompt_len, dtype=torch.long)
    for i, row in enumerate(rows):
        batch[i, int(pads[i]):] = torch.tensor(row, dtype=torch.long)
    batch = batch.to(device)
    padded = bool((pads > 0).any())
    # Row i's first real token sits at rotary position 0 (its padding at 0 too, hidden by the key
    # mask); in the caches every row's tokens sit at the same positions, 0 .. total - 1.
    positions = (torch.arange(prompt_len)[None, :] - pads[:, None]).clamp(min=0)  # (B, prompt_len)
    key_mask = (torch.arange(total)[None, :] >= pads[:, None]).to(device) if padded else None  # (B, total)
    caches = model.make_caches(len(rows), total)
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device)
        if seed is None:
            generator.seed()  # a fresh nondeterministic seed, leaving torch's global RNG alone
        else:
            generator.manual_seed(seed)
    stops = stops.to(device)
    done = torch.zeros(len(rows), dtype=torch.bool, device=device)
    finished_with = torch.zeros(len(rows), dtype=torch.long, device=device)
    logits = model(batch, positions=_rows_or_one(positions, padded, device), caches=caches, key_mask=key_mask,
                   cache_positions=torch.arange(prompt_len, device=device), last_only=True)[:, -1]
    step_logits = DecodeStep(model, caches, key_mask, compile=compile, native=native)
    for step in range(max_new_tokens):
        token, top = sample_and_top(logits, temperature, top_k, top_p, generator)
        _check_finite(top, step)
        token = torch.where(done, finished_with, token)
        yield token
        is_stop = torch.isin(token, stops)
        finished_with = torch.where(is_stop & ~done, token, finished_with)
        done |= is_stop
        if bool(done.all()) or step + 1 == max_new_tokens:
            return
        logits = step_logits(token, _rows_or_one((lengths + step)[:, None], padded, device),
                             torch.tensor([prompt_len + step], device=device))


def _rows_or_one(positions: torch.Tensor, padded: bool, device: torch.device) -> torch.Tensor:
    """``positions (B, N)`` on ``device``, as one ``(N,)`` row when no row is padded (all rows
    agree, and one row lets the rotary tables be shared by the batch)."""
    return (positions if padded else positions[0]).to(device)


def generate(
    model: CausalLM,
    tokens,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    seed: Optional[int] = None,
    stop_tokens: Optional[Sequence[int]] = None,
    on_token=None,
    compile: bool = False,
    native: bool = True,
):
    """Continue each prompt of ``tokens`` by up to ``max_new_tokens`` tokens.

    Args:
        model: a :class:`CausalLM` (a :class:`~attnkit.models.llama.Llama`, say).
        tokens: int tensor ``(B, N)``, or a list of B token-id lists of any lengths.
        temperature: 0 = greedy; otherwise the softmax temperature.
        top_k, top_p: restrict sampling to the k most likely tokens / the top_p nucleus.
        seed: seeds the sampler (same seed, same tokens).
        stop_tokens: ids that end a row (default: the config's ``eos_token_ids``); the stop token
            is kept. After a row stops, it is filled with its stop token until all rows stop.
        on_token: optional callback ``on_token(tokens (B,))`` after each step (for streaming).
        compile: compile the decoding step with ``torch.compile`` (see
            :mod:`attnkit.models.decode_step`: the same tokens, a compilation on the first step).
        native: decode with the native step where it applies (a GGUF quantized Llama or Gemma 3,
            one unpadded row, on the CPU: :mod:`attnkit.models.native_step`); False: the torch step.
    Returns:
        A tensor ``(B, N + steps)`` for tensor input, else a list of lists (prompt + new tokens,
        each ending at its stop token).
    Raises:
        ValueError: an empty prompt, a prompt plus ``max_new_tokens`` longer than
        ``max_position_embeddings`` (the cache), bad sampling options, ids outside the vocabulary.
    """
    steps = []
    for token in stream(model, tokens, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=seed, stop_tokens=stop_tokens, compile=compile, native=native):
        steps.append(token)
        if on_token is not None:
            on_token(token)
    new = torch.stack(steps, dim=1).cpu() if steps else torch.zeros(len(_as_rows(tokens)), 0, dtype=torch.long)
    if isinstance(tokens, torch.Tensor):
        return torch.cat([tokens.cpu(), new], dim=1).to(tokens.device)
    stop_set = set(_stop_list(model.config.eos_token_ids if stop_tokens is None else stop_tokens))
    out = []
    for row, continuation in zip(_as_rows(tokens), new.tolist()):
        for n, token in enumerate(continuation):
            if token in stop_set:
                continuation = continuation[: n + 1]
                break
        out.append(row + continuation)
    return out
