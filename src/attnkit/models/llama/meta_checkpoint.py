"""Convert Meta's original Llama 3 checkpoints (``params.json`` + ``consolidated.00.pth``).

Meta's layout differs from attnkit's (the Hugging Face one) in names and in the rotary layout:
Meta rotates adjacent feature pairs ``(2f, 2f + 1)`` of each head, attnkit rotates ``(f, f + D/2)``.
Rotating pair ``f`` of either layout by the same angle is the same function once the rows of
``wq`` (per query head) and ``wk`` (per key/value head) are reordered so that row ``2f + s`` of a
head becomes row ``f + s * D/2``; ``wv``, ``wo`` and the rest keep their rows.

``.pth`` files are read only with ``torch.load(weights_only=True)``: tensors and plain containers,
never arbitrary pickled objects.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

import torch

from ...nn.rope import Llama3RopeScaling
from ..checkpoint import JsonFields, check_floating, read_json
from .config import LlamaConfig
from .model import Llama, parameter_shapes

_LAYER_NAMES = {
    "attention_norm.weight": "attn_norm.weight",
    "attention.wq.weight": "attn.q_proj.weight",
    "attention.wk.weight": "attn.k_proj.weight",
    "attention.wv.weight": "attn.v_proj.weight",
    "attention.wo.weight": "attn.o_proj.weight",
    "ffn_norm.weight": "mlp_norm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "embed_tokens.weight", "norm.weight": "norm.weight",
              "output.weight": "lm_head.weight"}
_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)")


def interleaved_to_half_split(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a Meta ``wq``/``wk`` ``(n_heads * D, C)`` for half-split rotary."""
    rows, cols = weight.shape
    head_dim = rows // n_heads
    return weight.reshape(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _attnkit_name(name: str) -> Optional[str]:
    match = _LAYER_RE.fullmatch(name)
    if match:
        inner = _LAYER_NAMES.get(match[2])
        return None if inner is None else f"layers.{match[1]}.{inner}"
    return _TOP_NAMES.get(name)


def _load_state(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.pth`` file, read weights-only; ValueError naming the file and tensor
    unless it holds a dict of floating-point tensors."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise ValueError(f"{file}: cannot read it as a weights-only checkpoint ({exc})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{file}: expected a dict of tensors, got {type(state).__name__}")
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{file}: entry {name!r} is a {type(tensor).__name__}, not a tensor")
        check_floating(file, name, tensor)
    return state


def load_meta_checkpoint(
    path: str | os.PathLike,
    *,
    rope_scaling: Optional[Llama3RopeScaling] = None,
    dtype: Optional[torch.dtype] = None,
) -> Llama:
    """A :class:`Llama` from a Meta checkpoint directory with one ``consolidated.00.pth``.

    ``params.json`` says ``use_scaled_rope`` but not the factor (Llama 3.1 uses 8, Llama 3.2 uses
    32), so a scaled checkpoint needs ``rope_scaling``. It names no special tokens either: Llama 3's
    (bos 128000, eos 128001) are set for a 128256-token vocabulary, none otherwise. The output matrix is tied when the file has
    none or it equals the embedding. Raises FileNotFoundError for missing files and ValueError
    naming the file and field or tensor for a ``params.json`` that is not JSON or lacks a field or
    has one of the wrong type, model-parallel shards, and unknown, missing, mis-shaped or
    non-floating-point tensors.
    """
    directory = Path(path)
    params_file = directory / "params.json"
    params = JsonFields(read_json(params_file), params_file)
    shards = sorted(directory.glob("consolidated.*.pth"))
    if len(shards) != 1:
        raise ValueError(
            f"{directory}: expected one consolidated.00.pth, found {len(shards)} shards "
            "(merge model-parallel shards first)"
        )
    use_scaled_rope = params.boolean("use_scaled_rope", False)
    if use_scaled_rope and rope_scaling is None:
        raise ValueError(
            f"{params_file}: use_scaled_rope is set; pass rope_scaling (factor 8 for Llama 3.1, 32 for 3.2)"
        )
    n_heads = params.integer("n_heads")
    n_kv_heads = params.integer("n_kv_heads", n_heads)
    sizes = dict(dim=params.integer("dim"), n_layers=params.integer("n_layers"),
                 norm_eps=params.real("norm_eps", 1e-5), rope_theta=params.real("rope_theta", 500000.0))
    state = _load_state(shards[0])
    embedding = state.get("tok_embeddings.weight")
    if embedding is None:
        raise ValueError(f"{shards[0]}: missing tensor tok_embeddings.weight")
    output = state.get("output.weight")
    tied = output is None or torch.equal(output, embedding)
    w1 = state.get("layers.0.feed_forward.w1.weight")
    if w1 is None:
        raise ValueError(f"{shards[0]}: missing tensor layers.0.feed_forward.w1.weight")
    try:
        config = LlamaConfig(
            **sizes, n_heads=n_heads, n_kv_heads=n_kv_heads, ffn_dim=w1.shape[0], vocab_size=embedding.shape[0],
            rope_scaling=rope_scaling if use_scaled_rope else None, tie_embeddings=tied,
            # params.json names no special tokens; Llama 3's are known for its 128256-token vocabulary.
            bos_token_id=128000 if embedding.shape[0] == 128256 else None,
            eos_token_ids=(128001,) if embedding.shape[0] == 128256 else (),
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{params_file}: {exc}") from None
    converted = {}
    for name, tensor in state.items():
        target = _attnkit_name(name)
        if target is None:
            if name.endswith("rope.freqs"):  # a precomputed table some checkpoints carry
                continue
            raise ValueError(f"{shards[0]}: unexpected tensor {name}")
        if target == "lm_head.weight" and tied:
            continue
        if name.endswith("attention.wq.weight"):
            tensor = interleaved_to_half_split(tensor, n_heads)
        elif name.endswith("attention.wk.weight"):
            tensor = interleaved_to_half_split(tensor, n_kv_heads)
        converted[target] = tensor.to(dtype or tensor.dtype)
    expected = parameter_shapes(config)
    missing = sorted(set(expected) - set(converted))
    if missing:
        raise ValueError(f"{shards[0]}: missing tensors for {', '.join(missing[:5])}")
    for name, tensor in converted.items():
        if tensor.shape != expected[name]:
            raise ValueError(
                f"{shards[0]}: tensor for {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name])}"
            )
    return Llama.from_state(config, converted, "cpu")
