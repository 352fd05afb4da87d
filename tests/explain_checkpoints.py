"""Test helpers for ``attnkit explain``: tiny random Llama checkpoints (GQA, MQA) with a word-level
tokenizer, and the attention weights of any model recomputed the plain way, as the oracle."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from attnkit.functional import reference_attention
from attnkit.nn import MultiHeadAttention

WORDS = "the dog chased ball a cat saw mat".split()


def save_tiny_llama(path: Path, *, n_kv_heads: int = 2, bos: bool = True, seed: int = 0) -> Path:
    """A random tiny Llama (2 layers, 4 query heads, ``n_kv_heads`` KV heads) in the Hugging Face
    layout at ``path``, with a tokenizer.json whose words are :data:`WORDS` and ``w0`` ... ``w199``
    (and ``<s>`` in front of every text when ``bos``)."""
    tokenizers = pytest.importorskip("tokenizers")
    from attnkit.models import Llama, LlamaConfig

    torch.manual_seed(seed)
    config = dataclasses.replace(LlamaConfig.preset("tiny"), n_kv_heads=n_kv_heads)
    Llama(config).save_pretrained(path)
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2}
    for word in WORDS + [f"w{i}" for i in range(200)]:
        vocab[word] = len(vocab)
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    if bos:
        tokenizer.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.add_special_tokens(["<s>", "</s>"])
    tokenizer.save(str(path / "tokenizer.json"))
    return path


@torch.no_grad()
def layer_qkv(model: torch.nn.Module, ids: list[int]) -> list[tuple[MultiHeadAttention, tuple[torch.Tensor, ...]]]:
    """Each attention layer with its ``(q, k, v)`` in float64, made by the layer's own projections
    from its input in a forward pass of ``model`` on ``ids``."""
    layers = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    inputs = {}
    handles = [layer.register_forward_pre_hook(
        lambda module, args, kwargs, i=i: inputs.update({i: (args[0], kwargs.get("positions"))}), with_kwargs=True)
        for i, layer in enumerate(layers)]
    try:
        model(torch.tensor([ids]))
    finally:
        for handle in handles:
            handle.remove()
    return [(layer, tuple(t.double() for t in layer.project_qkv(*inputs[i]))) for i, layer in enumerate(layers)]


def reference_weights(model: torch.nn.Module, ids: list[int]) -> list[torch.Tensor]:
    """Every layer's ``(H, N, N)`` weights by :func:`attnkit.reference_attention` in float64."""
    return [reference_attention(*qkv, layer.pattern)[1][0] for layer, qkv in layer_qkv(model, ids)]


def reference_rows(model: torch.nn.Module, ids: list[int], rows: list[int]) -> list[torch.Tensor]:
    """Each layer's ``(H, R, N)`` weights of query ``rows`` by :func:`attnkit.reference_attention`
    in float64 without an N x N matrix: row ``p`` is one query over keys ``0 .. p`` (a causal
    model; later keys get 0)."""
    out = []
    for layer, (q, k, v) in layer_qkv(model, ids):
        weights = torch.zeros(q.shape[1], len(rows), len(ids), dtype=torch.float64)
        for r, p in enumerate(rows):
            weights[:, r, : p + 1] = reference_attention(q[:, :, p:p + 1], k[:, :, : p + 1], v[:, :, : p + 1],
                                                         layer.pattern)[1][0, :, 0]
        out.append(weights)
    return out
