"""Attention modules: multi-head (MHA / GQA / MQA) attention and its KV cache."""

from .attention import MultiHeadAttention
from .kv_cache import KVCache

__all__ = ["KVCache", "MultiHeadAttention"]
