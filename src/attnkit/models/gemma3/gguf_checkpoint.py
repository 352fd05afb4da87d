"""GGUF checkpoints (llama.cpp's single-file format) for :class:`~attnkit.models.gemma3.Gemma3`.

The file is read and its tensors dequantized by :mod:`attnkit.models.gguf_file`; this module maps
what it reads from a file of architecture ``gemma3`` onto attnkit's model:

- the config comes from the ``gemma3.*`` metadata (layers, heads, KV heads, widths, vocabulary,
  RMSNorm epsilon, the global RoPE base and its linear scaling, the window, context length) and
  the tokenizer's special tokens; what the file does not say (the layer pattern, the local RoPE
  base, the query scaling, the end-of-turn token) is Gemma 3's own constants from :mod:`.config`;
- llama.cpp's converter stores every RMSNorm weight as the multiplier ``1 + w``; attnkit (like
  Hugging Face) keeps ``w``, so 1 is subtracted on reading;
- Q and K rows keep their order: llama.cpp rotates Gemma's heads in the half-split layout too.

Supported tensor types: :data:`~attnkit.models.gguf_file.SUPPORTED_TYPE_NAMES` (the 270M file
holds Q4_K, Q5_0, Q6_K, Q8_0 and F32 tensors). With ``quantized=True`` the tensors of
:data:`~attnkit.models.quant.QUANTIZED_TYPE_NAMES` stay in their blocks
(:class:`~attnkit.models.quant.QuantizedLinear`, :class:`~attnkit.models.quant.QuantizedEmbedding`,
and a tied head that shares the embedding's blocks, so the output product reads them too).
"""

from __future__ import annotations

import os
from functools import partial
from typing import Optional

import torch
from torch import nn

from ...nn.rope import LinearRopeScaling
from ..gguf_file import dequantize, metadata, metadata_float, metadata_int, open_gguf, read_rows
from ..fuse import fuse_quantized_projections
from ...kernels.quant_native import FORMATS, to_kernel_layout
from ..checkpoint import meta_device, release_free_memory
from ..quant import QUANTIZED_TYPE_NAMES, QuantizedEmbedding, QuantizedLinear, install_quantized
from .config import END_OF_TURN, LOCAL_ROPE_THETA, Gemma3Config, default_layer_types, published_query_scalar
from .model import Gemma3, parameter_shapes

ARCHITECTURE = "gemma3"
"""``general.architecture`` of the GGUF files this adapter reads."""

# GGUF tensor name (per block, after "blk.N.") -> attnkit parameter name (after "layers.N.").
_LAYER_NAMES = {
    "attn_norm.weight": "attn_norm.weight",
    "attn_q.weight": "attn.q_proj.weight",
    "attn_k.weight": "attn.k_proj.weight",
    "attn_v.weight": "attn.v_proj.weight",
    "attn_output.weight": "attn.o_proj.weight",
    "attn_q_norm.weight": "attn.q_norm.weight",
    "attn_k_norm.weight": "attn.k_norm.weight",
    "post_attention_norm.weight": "post_attn_norm.weight",
    "ffn_norm.weight": "mlp_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "post_ffw_norm.weight": "post_mlp_norm.weight",
}
_TOP_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
              "output.weight": "lm_head.weight"}


def attnkit_name(gguf_name: str) -> Optional[str]:
    """The attnkit parameter name of a GGUF tensor name, or None when it has none."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


def _rope_scaling(reader, path, key) -> Optional[LinearRopeScaling]:
    kind = metadata(reader, path, key("rope.scaling.type"), "none")
    if kind == "none":
        return None
    if kind != "linear":
        raise ValueError(f"{path}: {key('rope.scaling.type')} {kind!r} is not supported (none or linear)")
    factor = metadata_float(reader, path, key("rope.scaling.factor"), 1.0)
    return None if factor == 1.0 else LinearRopeScaling(factor)


def config_from_gguf(reader, path: str | os.PathLike) -> Gemma3Config:
    """A :class:`Gemma3Config` from a GGUF file's metadata and Gemma 3's constants.

    Raises ValueError naming the file for another architecture, unequal key/value widths, an
    unsupported RoPE scaling, or missing and mistyped keys.
    """
    arch = metadata(reader, path, "general.architecture", required=True)
    if arch != ARCHITECTURE:
        raise ValueError(f"{path}: unsupported architecture {arch!r}; this adapter reads {ARCHITECTURE!r}")

    def key(name: str) -> str:
        return f"{ARCHITECTURE}.{name}"

    dim = metadata_int(reader, path, key("embedding_length"), required=True)
    n_layers = metadata_int(reader, path, key("block_count"), required=True)
    n_heads = metadata_int(reader, path, key("attention.head_count"), required=True)
    head_dim = metadata_int(reader, path, key("attention.key_length"), required=True)
    value_dim = metadata_int(reader, path, key("attention.value_length"), head_dim)
    if value_dim != head_dim:
        raise ValueError(f"{path}: key and value widths {head_dim}/{value_dim} differ; Gemma 3 has them equal")
    tokens = metadata(reader, path, "tokenizer.ggml.tokens", [])
    vocab = metadata_int(reader, path, key("vocab_size"), len(tokens) or None)
    if vocab is None:
        raise ValueError(f"{path}: GGUF metadata has neither {key('vocab_size')} nor tokenizer.ggml.tokens")
    eos = [metadata_int(reader, path, f"tokenizer.ggml.{name}_token_id") for name in ("eos", "eot")]
    if END_OF_TURN in tokens:
        eos.append(tokens.index(END_OF_TURN))
    try:
        return Gemma3Config(
            dim=dim, n_layers=n_layers, n_heads=n_heads,
            n_kv_heads=metadata_int(reader, path, key("attention.head_count_kv"), n_heads), head_dim=head_dim,
            ffn_dim=metadata_int(reader, path, key("feed_forward_length"), required=True), vocab_size=vocab,
            sliding_window=metadata_int(reader, path, key("attention.sliding_window"), required=True),
            layer_types=default_layer_types(n_layers),
            rope_theta=metadata_float(reader, path, key("rope.freq_base"), 1_000_000.0),
            rope_local_theta=LOCAL_ROPE_THETA, rope_scaling=_rope_scaling(reader, path, key),
            query_pre_attn_scalar=published_query_scalar(dim, n_layers, n_heads, head_dim),
            norm_eps=metadata_float(reader, path, key("attention.layer_norm_rms_epsilon"), 1e-6),
            max_position_embeddings=metadata_int(reader, path, key("context_length"), required=True),
            tie_embeddings="output.weight" not in {t.name for t in reader.tensors},
            bos_token_id=metadata_int(reader, path, "tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(t for t in eos if t is not None)),
        )
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: {exc}") from None


def load_gguf(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu", reader=None, quantized: bool = False) -> Gemma3:
    """A :class:`Gemma3` (eval mode) from a Gemma 3 GGUF file, weights dequantized to ``dtype``
    (float32 by default: quantized types have no torch dtype of their own), or, with
    ``quantized``, the quantized ones kept in their blocks (CPU, float32 activations). ``reader``,
    when given, is the already parsed file at ``path`` (it is parsed here otherwise).

    Raises FileNotFoundError for a missing file; ValueError naming the file for a non-GGUF or
    truncated file, another architecture, an unsupported tensor type, missing, unexpected or
    mis-shaped tensors, and ``quantized`` with another dtype or device.
    """
    if quantized and (torch.device(device).type != "cpu" or dtype != torch.float32):
        raise ValueError(f"{path}: quantized GGUF weights run on the CPU with float32 activations; got "
                         f"dtype={dtype}, device={device}")
    reader = reader if reader is not None else open_gguf(path)
    config = config_from_gguf(reader, path)
    shapes = parameter_shapes(config)
    state, kept = {}, {}
    for tensor in reader.tensors:
        name = attnkit_name(tensor.name)
        if name is None or name not in shapes:
            raise ValueError(f"{path}: unexpected tensor {tensor.name} for a {config.n_layers}-layer Gemma 3")
        shape = torch.Size(reversed([int(d) for d in tensor.shape]))
        if shape != shapes[name]:
            raise ValueError(f"{path}: tensor {tensor.name} has shape {tuple(shape)}, expected {tuple(shapes[name])}")
        if quantized and tensor.tensor_type.name in QUANTIZED_TYPE_NAMES:
            kind = tensor.tensor_type.name
            layer = QuantizedEmbedding if name == "embed_tokens.weight" else QuantizedLinear
            kept[name] = layer(read_rows(tensor, path, partial(to_kernel_layout, fmt=FORMATS[kind])), kind)
            continue
        weight = torch.from_numpy(dequantize(tensor, path)).reshape(shape)
        if name.endswith("norm.weight"):
            weight = weight - 1  # the file holds the multiplier 1 + w
        state[name] = weight.to(device=device, dtype=dtype)
    missing = sorted(set(shapes) - set(state) - set(kept))
    if missing:
        raise ValueError(f"{path}: missing tensors {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    model = _with_quantized(config, state, kept) if kept else Gemma3.from_state(config, state, device)
    release_free_memory()  # the chunks and the rows that fused projections replaced
    return model


def _with_quantized(config: Gemma3Config, state: dict[str, torch.Tensor], kept: dict[str, nn.Module]) -> Gemma3:
    """A CPU :class:`Gemma3` whose parameters named in ``kept`` are those quantized layers, the
    others from ``state``; a tied head shares the embedding's blocks,
    and projections of one input in one format are fused (:mod:`attnkit.models.fuse`)."""
    with meta_device():
        model = Gemma3(config)
    install_quantized(model, kept, config.tie_embeddings)
    model = Gemma3.from_state(config, state, "cpu", model=model)
    fuse_quantized_projections(model)
    return model
