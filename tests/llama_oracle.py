"""Tiny random Llama models shared by the Llama tests: transformers' LlamaForCausalLM as the oracle.

Weights are O(1)-scale (rows of unit norm for matrices, norms around 1) so a wrong rotation,
grouping or scaling changes the logits far beyond float32 noise.
"""

from __future__ import annotations

import torch

transformers = __import__("pytest").importorskip("transformers")

SHAPES = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=6, num_key_value_heads=2),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1),
}


def hf_config(shape: str = "gqa", *, tied: bool = False, scaled: bool = True, legacy: bool = False,
              vocab: int = 97, layers: int = 2):
    """A transformers LlamaConfig; ``scaled`` uses llama3 rope scaling over 16 original positions
    (tests use longer sequences, so the scaling changes the result); ``legacy`` writes
    ``rope_theta`` + ``rope_scaling`` instead of ``rope_parameters``."""
    heads = SHAPES[shape]
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16} if scaled else {"rope_type": "default"}
    kwargs = dict(vocab_size=vocab, hidden_size=48, intermediate_size=80, num_hidden_layers=layers,
                  max_position_embeddings=256, tie_word_embeddings=tied, rms_norm_eps=1e-5,
                  bos_token_id=1, eos_token_id=2, **heads)
    if legacy:
        kwargs.update(rope_theta=10000.0, rope_scaling=rope if scaled else None)
    else:
        kwargs.update(rope_parameters={**rope, "rope_theta": 10000.0})
    return transformers.LlamaConfig(**kwargs)


def hf_model(config, seed: int = 0):
    """``LlamaForCausalLM(config)`` in eval mode with O(1)-scale random weights."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn_like(param) / param.shape[-1] ** 0.5)
            else:
                param.copy_(1 + 0.2 * torch.randn_like(param))
    return model


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a - b).abs().max() / b.abs().max())
