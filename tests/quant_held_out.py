"""Held-out accuracy of a model with GGUF blocks kept, against the same file dequantized to float32
(shared by ``test_quant_smollm2.py`` and ``test_quant_gemma3.py``).

Held-out text: ``data/stdlib_docstrings.txt`` (docstrings of standard-library modules, used for
nothing else). The first ``TOKENS`` tokens are teacher-forced; the quantized model reads them in
chunks of 1 to ``NATIVE_ROWS`` tokens through its KV caches, so every position's logits come from
the native kernels (one row, row blocks and ragged blocks), not from the dequantized tiles of a
long prefill. Only each position's top-1 token and the log-probability of the next token are
kept (a 262k-token vocabulary makes the full logits of 512 positions half a gigabyte); the float32
model reads the text in chunks of ROWS_AT_ONCE tokens.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import torch

from attnkit.kernels.quant_ops import NATIVE_ROWS

HELD_OUT = Path(__file__).parent / "data" / "stdlib_docstrings.txt"
TOKENS = 512
ROWS_AT_ONCE = 64  # tokens per forward call of the float32 model (small logits for a large vocabulary)


def held_out_tokens(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens (1, TOKENS), targets (TOKENS,))``: the text and the tokens that follow each position."""
    ids = tokenizer.encode(HELD_OUT.read_text())[:TOKENS + 1]
    assert len(ids) == TOKENS + 1
    return torch.tensor([ids[:-1]]), torch.tensor(ids[1:])


def _summary(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(top-1 ids, log-probabilities of targets)`` of ``logits (n, vocab)``."""
    return logits.argmax(-1), torch.log_softmax(logits.double(), -1).gather(-1, targets[:, None])[:, 0]


def _summary_by_chunks(model, tokens: torch.Tensor, targets: torch.Tensor, sizes) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 ids and target log-probabilities of ``model`` fed ``tokens`` in chunks of ``sizes``
    (an iterable of chunk lengths) through its KV caches."""
    caches, parts, start = model.make_caches(1, tokens.shape[1]), [], 0
    for size in sizes:
        if start >= tokens.shape[1]:
            break
        logits = model(tokens[:, start:start + size], caches=caches)[0]
        parts.append(_summary(logits, targets[start:start + size]))
        start += size
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def agreement_and_perplexity_ratio(quantized, reference, tokenizer) -> tuple[float, float]:
    """``(top-1 agreement, perplexity ratio quantized / float32)`` on the held-out text."""
    tokens, targets = held_out_tokens(tokenizer)
    with torch.no_grad():
        expected_top, expected_logp = _summary_by_chunks(reference, tokens, targets, itertools.repeat(ROWS_AT_ONCE))
        got_top, got_logp = _summary_by_chunks(quantized, tokens, targets, itertools.cycle(range(1, NATIVE_ROWS + 1)))
    agreement = float((got_top == expected_top).double().mean())
    return agreement, math.exp(float(expected_logp.mean() - got_logp.mean()))
