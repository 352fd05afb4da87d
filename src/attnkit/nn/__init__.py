"""Attention modules: multi-head (MHA / GQA / MQA) attention and its KV cache."""

from .attention import MultiHeadAttention
from .kv_cache import KVCache
from .rolling_cache import RollingKVCache
from .sink_cache import SinkCache, sink_pattern
from .mlp import GeGLU, SwiGLU
from .norm import RMSNorm, ZeroCenteredRMSNorm
from .rope import LinearRopeScaling, Llama3RopeScaling, RotaryEmbedding

__all__ = ["GeGLU", "KVCache", "LinearRopeScaling", "Llama3RopeScaling", "MultiHeadAttention", "RollingKVCache", "RMSNorm",
           "RotaryEmbedding", "SinkCache", "SwiGLU", "ZeroCenteredRMSNorm", "sink_pattern"]
