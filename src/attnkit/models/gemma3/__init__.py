"""Gemma 3 (text): sliding-window and global attention layers, MQA / GQA, QK-norm.

``config`` (:class:`Gemma3Config`, :data:`PRESETS`, Gemma 3's constants), ``model``
(:class:`Gemma3`), one adapter per checkpoint format (``hf_checkpoint``: Hugging Face
safetensors; ``gguf_checkpoint``: llama.cpp's GGUF), and ``source`` (the loaders the model
registry calls).
"""

from .config import PRESETS, Gemma3Config
from .model import Gemma3, parameter_shapes
from .source import LOADERS, layers_and_heads, load_hf

__all__ = ["LOADERS", "PRESETS", "Gemma3", "Gemma3Config", "layers_and_heads", "load_hf",
           "parameter_shapes"]
