"""What a Llama configuration costs: parameters by component, KV-cache bytes, FLOPs per token.

Conventions: a multiply-add is 2 FLOPs; attention at context ``n`` costs ``4 * L * Hq * D * n``
FLOPs per token (scores ``q . k`` and the weighted sum of values); a causal prefill of ``N``
tokens averages ``(N + 1) / 2`` keys per token. Prefill computes the vocabulary head once (for
the last token, as generation does); decode computes it for every token. Bytes read per decode
token are every weight except the embedding table (one row is gathered; a tied head reads the
table as the head) plus the whole KV cache.
"""

from __future__ import annotations

from dataclasses import replace

from ..checks import positive_int
from ..models.llama import LlamaConfig

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
CONTEXTS = (128, 512, 2048, 8192, 32768, 131072)


def parameters(config: LlamaConfig) -> dict[str, int]:
    """Parameters by component: embedding, attention, mlp, norms, head (0 when tied), total."""
    c = config
    attention = c.n_layers * c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)
    counts = {
        "embedding": c.vocab_size * c.dim,
        "attention": attention,
        "mlp": c.n_layers * 3 * c.dim * c.ffn_dim,
        "norms": (2 * c.n_layers + 1) * c.dim,
        "head": 0 if c.tie_embeddings else c.vocab_size * c.dim,
    }
    counts["total"] = sum(counts.values())
    return counts


def kv_bytes_per_token(config: LlamaConfig, dtype_bytes: int) -> int:
    """Bytes of keys and values one token adds to the cache (all layers)."""
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * dtype_bytes


def attention_variants(config: LlamaConfig) -> dict[str, LlamaConfig]:
    """The same model with MHA (``Hkv = Hq``), its own GQA, and MQA (``Hkv = 1``)."""
    return {
        "MHA": replace(config, n_kv_heads=config.n_heads),
        f"GQA ({config.n_kv_heads} kv)": config,
        "MQA": replace(config, n_kv_heads=1),
    }


def flops_per_token(config: LlamaConfig, context: int) -> dict[str, float]:
    """FLOPs per token by part at ``context`` keys: attention projections, attention scores and
    sums, mlp, head (each for one token, head included)."""
    c = config
    return {
        "attn_proj": 2.0 * c.n_layers * c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads),
        "attn_scores": 4.0 * c.n_layers * c.n_heads * c.head_dim * context,
        "mlp": 2.0 * c.n_layers * 3 * c.dim * c.ffn_dim,
        "head": 2.0 * c.dim * c.vocab_size,
    }


def prefill_flops_per_token(config: LlamaConfig, n_tokens: int) -> float:
    """Average FLOPs per prompt token of a causal prefill of ``n_tokens`` (head once)."""
    parts = flops_per_token(config, 0)
    causal = flops_per_token(config, 1)["attn_scores"] * (n_tokens + 1) / 2
    return parts["attn_proj"] + parts["mlp"] + causal + parts["head"] / n_tokens


def decode_flops_per_token(config: LlamaConfig, context: int) -> float:
    """FLOPs of one decode step with ``context`` cached keys (the new one included)."""
    return sum(flops_per_token(config, context).values())


def decode_bytes_per_token(config: LlamaConfig, context: int, dtype_bytes: int, batch: int = 1) -> float:
    """Bytes read from memory per generated token (per row of a batch of ``batch``): the weights
    once per step shared by the batch, plus each row's KV cache of ``context`` tokens."""
    p = parameters(config)
    weights = (p["total"] - p["embedding"] + (p["embedding"] if config.tie_embeddings else 0)) * dtype_bytes
    return weights / batch + kv_bytes_per_token(config, dtype_bytes) * context


def compute_shares(config: LlamaConfig, contexts=CONTEXTS) -> list[dict[str, float]]:
    """Per decode token at each context: attention (projections + scores), mlp and head shares."""
    rows = []
    for n in contexts:
        f = flops_per_token(config, n)
        total = sum(f.values())
        rows.append({"context": n, "attention": (f["attn_proj"] + f["attn_scores"]) / total,
                     "mlp": f["mlp"] / total, "head": f["head"] / total, "flops": total})
    return rows


def _check_positive(name: str, value: object) -> None:
    positive_int("arch", name, value)


def report(config: LlamaConfig, *, context: int = 8192, batch: int = 1, contexts=CONTEXTS) -> dict:
    """Everything ``attnkit arch`` shows, as plain data (JSON-ready)."""
    _check_positive("context", context)
    _check_positive("batch", batch)
    for n in contexts:
        _check_positive("contexts", n)
    variants = {}
    for name, variant in attention_variants(config).items():
        per_token = {d: kv_bytes_per_token(variant, b) for d, b in DTYPE_BYTES.items()}
        variants[name] = {
            "n_kv_heads": variant.n_kv_heads,
            "parameters": parameters(variant)["total"],
            "kv_bytes_per_token": per_token,
            "kv_bytes_total": {d: v * context * batch for d, v in per_token.items()},
        }
    return {
        "config": {k: getattr(config, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                                                     "ffn_dim", "vocab_size", "tie_embeddings")},
        "parameters": parameters(config),
        "context": context,
        "batch": batch,
        "kv_cache": variants,
        "flops_per_token": {
            "prefill": prefill_flops_per_token(config, context),
            "decode": decode_flops_per_token(config, context),
        },
        "decode_bytes_per_token": {d: decode_bytes_per_token(config, context, b, batch) for d, b in DTYPE_BYTES.items()},
        "compute_shares": compute_shares(config, contexts),
    }
