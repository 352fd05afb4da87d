"""Attention modules: multi-head (MHA / GQA / MQA) attention and its KV cache."""

from .attention import MultiHeadAttention
from .kv_cache import KVCache
from .rolling_cache import RollingKVCache
from .mlp import SwiGLU
from .norm import RMSNorm
from .rope import Llama3RopeScaling, RotaryEmbedding

__all__ = ["KVCache", "Llama3RopeScaling", "MultiHeadAttention", "RollingKVCache", "RMSNorm", "RotaryEmbedding", "SwiGLU"]
