"""``BertConfig``: the sizes of a BERT encoder, validated, read from a Hugging Face ``config.json``."""

from __future__ import annotations

from dataclasses import dataclass, fields

from torch import nn

from ...checks import finite_real, positive_int
from ..checkpoint import JsonFields, bounded_size

ACTIVATIONS = {
    "gelu": nn.functional.gelu,
    "gelu_new": lambda x: nn.functional.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: nn.functional.gelu(x, approximate="tanh"),
    "relu": nn.functional.relu,
}
"""``hidden_act`` values of Hugging Face BERT configs that this encoder runs."""

@dataclass(frozen=True)
class BertConfig:
    """Sizes of a BERT encoder; field names follow Hugging Face's ``config.json``.

    ``hidden_size`` must be a multiple of ``num_attention_heads`` (head width
    ``hidden_size // num_attention_heads``). Raises ValueError (TypeError for a non-integer size)
    naming the first bad field; a size above :data:`~attnkit.models.checkpoint.MAX_SIZE` is refused.
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
                size = positive_int("BertConfig", f.name, getattr(self, f.name))
                object.__setattr__(self, f.name, bounded_size("BertConfig", f.name, size))
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
