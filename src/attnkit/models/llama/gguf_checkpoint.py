"""GGUF checkpoints (llama.cpp's single-file format) for :class:`~attnkit.models.llama.Llama`.

The file is read and its tensors dequantized by :mod:`attnkit.models.gguf_file`; this module maps
what it reads from a file of architecture ``llama`` onto attnkit's model:

- the config comes from the ``llama.*`` metadata (layers, heads, KV heads, widths, vocabulary,
  RMSNorm epsilon, RoPE base, context length) and the tokenizer's special token ids; the head is
  tied when the file has no ``output.weight``;
- Llama 3 RoPE scaling is stored by llama.cpp's converter as a ``rope_freqs`` tensor of per-pair
  divisors, not as metadata; the :class:`Llama3RopeScaling` that produces exactly those divisors
  is recovered from it (and checked);
- llama.cpp's converter reorders the rows of ``attn_q`` and ``attn_k`` so that each head's RoPE
  pairs are adjacent (its rotation pairs neighbouring features; Hugging Face's pairs the two
  halves); :func:`unpermute_rows` puts them back.

Supported tensor types: :data:`~attnkit.models.gguf_file.SUPPORTED_TYPE_NAMES`. With
``quantized=True`` the tensors of :data:`~attnkit.models.quant.QUANTIZED_TYPE_NAMES` stay in their
blocks (:class:`~attnkit.models.quant.QuantizedLinear`, :class:`~attnkit.models.quant.QuantizedEmbedding`,
and a tied head that shares the embedding's blocks); the others are dequantized to float32.
"""

from __future__ import annotations

import math
import os
from functools import partial
from typing import Optional

import torch
from torch import nn

from ...nn.rope import Llama3RopeScaling, rope_frequencies
from ..checkpoint import check_layer_count, meta_device, release_free_memory
from ..gguf_file import dequantize, metadata, metadata_float, metadata_int, open_gguf, read_rows
from ..fuse import fuse_quantized_projections
from ...kernels.quant_native import FORMATS, to_kernel_layout
from ..quant import QUANTIZED_TYPE_NAMES, QuantizedEmbedding, QuantizedLinear, install_quantized
from .config import LlamaConfig
from .model import Llama, parameter_shapes

ARCHITECTURE = "llama"
"""``general.architecture`` of the GGUF files this adapter reads."""

# GGUF tensor name (per block, after "blk.N.") -> attnkit parameter name (after "layers.N.").
_LAYER_NAMES = {
    "attn_norm.weight": "attn_norm.weight",
    "attn_q.weight": "attn.q_proj.weight",
    "attn_k.weight": "attn.k_proj.weight",
    "attn_v.weight": "attn.v_proj.weight",
    "attn_output.weight": "attn.o_proj.weight",
    "ffn_norm.weight": "mlp_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
              "output.weight": "lm_head.weight"}
_ROPE_FREQS = "rope_freqs.weight"


def attnkit_name(gguf_name: str) -> Optional[str]:
    """The attnkit parameter name of a GGUF tensor name, or None when it has none."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


def unpermute_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order: ``(n_heads * D, in)`` with each head's rows ordered
    ``0, D/2, 1, D/2 + 1, ...`` back to ``0, 1, ..., D - 1`` (Hugging Face's half-split RoPE)."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def permute_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's converter order (the inverse of :func:`unpermute_rows`); used to write GGUF files."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _rope_scaling_from_freqs(divisors: torch.Tensor, head_dim: int, theta: float, original: int,
                             path) -> Optional[Llama3RopeScaling]:
    """The Llama 3 scaling whose frequency divisors are ``divisors (head_dim / 2,)``.

    Between its two cut-offs the scaling blends the kept and the divided frequency with a weight
    linear in ``1 / wavelength``; fitting that line on the blended pairs gives the two cut-off
    factors. The result is checked against the divisors; ValueError naming the file if it fails.
    """
    divisors = divisors.double()
    factor = float(divisors.max())
    if factor == 1.0 and bool((divisors == 1).all()):
        return None
    inv_freq = rope_frequencies(head_dim, theta, None)
    low, high = 1.0, 4.0
    blend = (1 / divisors - 1 / factor) / (1 - 1 / factor)  # 1 = kept, 0 = divided by factor
    inner = (blend > 1e-6) & (blend < 1 - 1e-6)
    if int(inner.sum()) >= 2:
        # blend = original / wavelen / (high - low) - low / (high - low)
        x = (inv_freq / (2 * math.pi))[inner]
        slope, intercept = torch.linalg.lstsq(torch.stack([x, torch.ones_like(x)], 1), blend[inner, None]).solution[:, 0]
        width = original / float(slope)
        low = -float(intercept) * width
        high = low + width
    try:
        scaling = Llama3RopeScaling(factor=factor, low_freq_factor=low, high_freq_factor=high,
                                    original_max_position_embeddings=original)
    except ValueError as exc:
        raise ValueError(f"{path}: {_ROPE_FREQS} is not a Llama 3 RoPE scaling ({exc})") from None
    if not _scaling_fits(scaling, divisors, inv_freq, head_dim, theta):
        raise ValueError(f"{path}: {_ROPE_FREQS} is not a Llama 3 RoPE scaling that attnkit can represent")
    # The fit carries float32 noise (1.0000000130); 6 significant digits give back the values
    # the model's authors chose, kept only if they still reproduce the divisors.
    rounded = Llama3RopeScaling(factor=float(f"{factor:.6g}"), low_freq_factor=float(f"{low:.6g}"),
                                high_freq_factor=float(f"{high:.6g}"), original_max_position_embeddings=original)
    return rounded if _scaling_fits(rounded, divisors, inv_freq, head_dim, theta) else scaling


def _scaling_fits(scaling: Llama3RopeScaling, divisors: torch.Tensor, inv_freq: torch.Tensor, head_dim: int,
                  theta: float) -> bool:
    return torch.allclose(inv_freq / rope_frequencies(head_dim, theta, scaling), divisors, rtol=1e-5, atol=0)


def config_from_gguf(reader, path: str | os.PathLike) -> LlamaConfig:
    """A :class:`LlamaConfig` from a GGUF file's metadata (and its ``rope_freqs`` tensor, if any).

    Raises ValueError naming the file for another architecture, an unsupported RoPE variant
    (linear or YaRN scaling, partial rotary dimensions) or missing and mistyped keys.
    """
    arch = metadata(reader, path, "general.architecture", required=True)
    if arch != ARCHITECTURE:
        raise ValueError(f"{path}: unsupported architecture {arch!r}; attnkit loads GGUF files of architecture {ARCHITECTURE!r}")

    def key(name: str) -> str:
        return f"{ARCHITECTURE}.{name}"

    dim = metadata_int(reader, path, key("embedding_length"), required=True)
    n_heads = metadata_int(reader, path, key("attention.head_count"), required=True)
    head_dim = metadata_int(reader, path, key("attention.key_length"), dim // n_heads if n_heads else None)
    value_dim = metadata_int(reader, path, key("attention.value_length"), head_dim)
    rope_dims = metadata_int(reader, path, key("rope.dimension_count"), head_dim)
    if value_dim != head_dim or rope_dims != head_dim:
        raise ValueError(
            f"{path}: key/value/rotary widths {head_dim}/{value_dim}/{rope_dims} differ; attnkit's Llama needs them equal"
        )
    scaling_type = metadata(reader, path, key("rope.scaling.type"), "none")
    if scaling_type not in ("none", "llama3"):
        raise ValueError(f"{path}: {key('rope.scaling.type')} {scaling_type!r} is not supported (none, or Llama 3 rope_freqs)")
    theta = metadata_float(reader, path, key("rope.freq_base"), 10000.0)
    tokens = metadata(reader, path, "tokenizer.ggml.tokens")
    vocab = metadata_int(reader, path, key("vocab_size"), len(tokens) if tokens is not None else None)
    if vocab is None:
        raise ValueError(f"{path}: GGUF metadata has neither {key('vocab_size')} nor tokenizer.ggml.tokens")
    names = {t.name: t for t in reader.tensors}
    scaling = None
    if _ROPE_FREQS in names:
        original = metadata_int(reader, path, key("rope.scaling.original_context_length"), 8192)
        divisors = torch.from_numpy(dequantize(names[_ROPE_FREQS], path)).reshape(-1)
        if divisors.numel() != head_dim // 2:
            raise ValueError(f"{path}: {_ROPE_FREQS} has {divisors.numel()} entries, expected {head_dim // 2}")
        scaling = _rope_scaling_from_freqs(divisors, head_dim, theta, original, path)
    bos = metadata_int(reader, path, "tokenizer.ggml.bos_token_id")
    eos = [metadata_int(reader, path, f"tokenizer.ggml.{name}_token_id") for name in ("eos", "eot")]
    try:
        config = LlamaConfig(
            dim=dim, n_layers=metadata_int(reader, path, key("block_count"), required=True), n_heads=n_heads,
            n_kv_heads=metadata_int(reader, path, key("attention.head_count_kv"), n_heads),
            ffn_dim=metadata_int(reader, path, key("feed_forward_length"), required=True), vocab_size=vocab,
            head_dim=head_dim, norm_eps=metadata_float(reader, path, key("attention.layer_norm_rms_epsilon"), 1e-5),
            rope_theta=theta, rope_scaling=scaling,
            max_position_embeddings=metadata_int(reader, path, key("context_length"), 2048),
            tie_embeddings="output.weight" not in names, bos_token_id=bos,
            eos_token_ids=tuple(dict.fromkeys(t for t in eos if t is not None)),
        )
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    check_layer_count(config.n_layers, names, r"blk\.(\d+)\.", path, key("block_count"))
    return config


def load_gguf(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu", reader=None, quantized: bool = False) -> Llama:
    """A :class:`Llama` (eval mode) from a Llama-architecture GGUF file. ``reader``, when given, is
    the already parsed file at ``path`` (it is parsed here otherwise).

    Weights are dequantized to ``dtype`` (float32 by default: the exact reference of the file),
    or, with ``quantized``, the quantized ones stay in their blocks (see the module docstring; CPU
    only, float32 activations, so ``dtype`` must be float32).

    Raises FileNotFoundError for a missing file; ValueError naming the file for a non-GGUF or
    truncated file, another architecture, an unsupported tensor type, and missing, unexpected or
    mis-shaped tensors, and for ``quantized`` with another dtype or device.
    """
    if quantized and (torch.device(device).type != "cpu" or dtype != torch.float32):
        raise ValueError(f"{path}: quantized GGUF weights run on the CPU with float32 activations; got "
                         f"device {device} and dtype {dtype} (give a dtype to dequantize the weights instead)")
    reader = reader if reader is not None else open_gguf(path)
    config = config_from_gguf(reader, path)
    shapes = parameter_shapes(config)
    state, kept = {}, {}
    for tensor in reader.tensors:
        if tensor.name == _ROPE_FREQS:
            continue
        name = attnkit_name(tensor.name)
        if name is None or name not in shapes:
            raise ValueError(f"{path}: unexpected tensor {tensor.name} for a {config.n_layers}-layer Llama")
        shape = torch.Size(reversed([int(d) for d in tensor.shape]))
        if shape != shapes[name]:
            raise ValueError(f"{path}: tensor {tensor.name} has shape {tuple(shape)}, expected {tuple(shapes[name])}")
        kind = tensor.tensor_type.name if quantized and tensor.tensor_type.name in QUANTIZED_TYPE_NAMES else None
        if kind is not None:
            # rows of blocks in the kernels' layout: row permutations apply as to floats
            weight = read_rows(tensor, path, partial(to_kernel_layout, fmt=FORMATS[kind]))
        else:
            weight = torch.from_numpy(dequantize(tensor, path)).reshape(shape)
        if name.endswith("attn.q_proj.weight"):
            weight = unpermute_rows(weight, config.n_heads)
        elif name.endswith("attn.k_proj.weight"):
            weight = unpermute_rows(weight, config.n_kv_heads)
        if kind is None:
            state[name] = weight.to(device=device, dtype=dtype)
        else:
            layer = QuantizedEmbedding if name == "embed_tokens.weight" else QuantizedLinear
            kept[name] = layer(weight.contiguous(), kind)
    missing = sorted(set(shapes) - set(state) - set(kept))
    if missing:
        raise ValueError(f"{path}: missing tensors {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    model = _with_quantized(config, state, kept) if kept else Llama.from_state(config, state, device)
    release_free_memory()  # the chunks and the rows that fused projections replaced
    return model


def _with_quantized(config: LlamaConfig, state: dict[str, torch.Tensor], kept: dict[str, nn.Module]) -> Llama:
    """A CPU :class:`Llama` whose parameters named in ``kept`` are those quantized layers, the
    others taken from ``state``; a tied head shares the embedding's blocks,
    and projections of one input in one format are fused (:mod:`attnkit.models.fuse`)."""
    with meta_device():
        model = Llama(config)
    install_quantized(model, kept, config.tie_embeddings)
    blocks = {name: tensor for name, tensor in model.state_dict().items() if name not in state}
    model.load_state_dict({**state, **blocks}, assign=True, strict=True)
    model.rope.reset_frequencies("cpu")
    fuse_quantized_projections(model)
    return model.eval()
