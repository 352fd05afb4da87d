"""Tiny GGUF files for the GGUF tests, written with the ``gguf`` package's writer.

The model is a random attnkit Llama whose matrices have an input width of 256, so every GGML
block size (32, and 256 for the K-quants) divides them. Tensors go in llama.cpp's layout: Q/K rows
permuted as its converter does, dims listed innermost first. Types ``gguf.quants.quantize`` can
produce are quantized from the weights; for the K-quants (which it cannot produce) the blocks are
random bytes with small finite scales, so the file is still a valid, fully determined model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

gguf = __import__("pytest").importorskip("gguf")

from attnkit.models.gguf_tokenizer import _byte_alphabet  # noqa: E402
from attnkit.models.llama import Llama, LlamaConfig  # noqa: E402
from attnkit.models.llama.gguf_checkpoint import permute_rows  # noqa: E402

T = gguf.GGMLQuantizationType

MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s", "a t", "e n", "Ġ w", "o r",
          "in g", "Ġ c", "Ġ 1", "1 2", "Ġ (", "d e", "de f", "Ġ Ġ", "ĠĠ ĠĠ", "Ċ Ċ", "Ã ©"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = ["<think>"]
SPACED_CONTROL = "<|tool call|>"  # a control token with a character outside the byte alphabet
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def vocabulary() -> tuple[list[str], list[int]]:
    """Specials, the 256 byte letters, the merged tokens, a user-defined token and a control token
    with a space in it, with types."""
    alphabet = _byte_alphabet()
    tokens = (SPECIALS + [alphabet[b] for b in range(256)] + ["".join(m.split(" ")) for m in MERGES] + USER_DEFINED
              + [SPACED_CONTROL])
    types = [3] * len(SPECIALS) + [1] * (256 + len(MERGES)) + [4] * len(USER_DEFINED) + [3]
    return tokens, types


def tiny_config(**overrides) -> LlamaConfig:
    settings = dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256, vocab_size=len(vocabulary()[0]),
                    rope_theta=10000.0, max_position_embeddings=512, norm_eps=1e-5, bos_token_id=1,
                    eos_token_ids=(2,), tie_embeddings=False)
    settings.update(overrides)
    return LlamaConfig(**settings)


def tiny_model(config: LlamaConfig, seed: int = 0) -> Llama:
    """A float32 Llama with O(1)-scale weights (unit-norm rows, norms near 1)."""
    torch.manual_seed(seed)
    model = Llama(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.nn.functional.normalize(torch.randn_like(p), dim=-1) * (1 if "embed" in name else 3))
            else:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


def _gguf_name(name: str) -> str:
    table = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if name in table:
        return table[name]
    _, layer, rest = name.split(".", 2)
    per_layer = {"attn_norm.weight": "attn_norm", "attn.q_proj.weight": "attn_q", "attn.k_proj.weight": "attn_k",
                 "attn.v_proj.weight": "attn_v", "attn.o_proj.weight": "attn_output", "mlp_norm.weight": "ffn_norm",
                 "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up", "mlp.down_proj.weight": "ffn_down"}
    return f"blk.{layer}.{per_layer[rest]}.weight"


def random_blocks(kind, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Valid ``kind`` blocks ``(rows, bytes)`` of random quants with small finite float16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scale = lambda n: rng.uniform(1e-4, 5e-4, (rows, cols // block, n)).astype(np.float16).view(np.uint8)  # noqa: E731
    if kind in (T.Q4_K, T.Q5_K, T.Q2_K):  # d, dmin first (Q2_K: last)
        if kind == T.Q2_K:
            raw[..., -4:] = scale(2)
        else:
            raw[..., :4] = scale(2)
    elif kind in (T.Q3_K, T.Q6_K):  # d last
        raw[..., -2:] = scale(1)
    else:
        raise ValueError(f"random_blocks: {kind.name} is produced by gguf.quants.quantize")
    return raw.reshape(rows, -1)


def encode_tensor(weight: torch.Tensor, kind, rng: np.random.Generator) -> np.ndarray:
    """``weight (rows, cols)`` as ``kind`` data for the writer (quantized or random blocks)."""
    values = weight.detach().numpy().astype(np.float32)
    if kind == T.F32:
        return values
    if kind == T.F16:
        return values.astype(np.float16)
    if kind in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K):
        return random_blocks(kind, *values.shape, rng)
    return gguf.quants.quantize(values, kind)


def write_gguf(path: Path, model: Llama, kind=T.F32, *, arch: str = "llama", pre: str = "smollm",
               add_bos: bool = False, rope_freqs: Optional[torch.Tensor] = None, metadata: Optional[dict] = None,
               seed: int = 0) -> Path:
    """Write ``model`` as a GGUF file with its matrices in ``kind`` (norms stay F32), a byte-level
    BPE tokenizer and a chat template. ``metadata`` adds or overrides string/number keys."""
    config = model.config
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.n_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.dim)
    writer.add_feed_forward_length(config.ffn_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(int(kind))
    tokens, types = vocabulary()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_ids[0])
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(CHAT_TEMPLATE)
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_float32(key, value)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.numpy().astype(np.float32))
    for name, weight in model.state_dict().items():
        if name.endswith("q_proj.weight"):
            weight = permute_rows(weight, config.n_heads)
        elif name.endswith("k_proj.weight"):
            weight = permute_rows(weight, config.n_kv_heads)
        if weight.dim() == 1:
            writer.add_tensor(_gguf_name(name), weight.numpy().astype(np.float32))
            continue
        data = encode_tensor(weight, kind, rng)
        raw = kind if data.dtype == np.uint8 else None
        writer.add_tensor(_gguf_name(name), data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
