"""Llama 3.1 / 3.2, the decoder that ``attnkit generate``, ``chat`` and ``lab`` run.

``config`` (:class:`LlamaConfig`, :data:`PRESETS`), ``model`` (:class:`Llama`), one adapter per
checkpoint format (``hf_checkpoint``: Hugging Face safetensors; ``gguf_checkpoint``: llama.cpp's
GGUF; ``meta_checkpoint``: Meta's ``params.json`` + ``.pth``), and ``source`` (the loaders the
model registry calls, and the default SmolLM2 model).
"""

from .config import PRESETS, LlamaConfig
from .model import Llama, count_parameters, parameter_shapes
from .source import LOADERS, default_model, layers_and_heads, load_llama, read_llama_config

__all__ = ["LOADERS", "PRESETS", "Llama", "LlamaConfig", "count_parameters", "default_model", "layers_and_heads",
           "load_llama", "parameter_shapes", "read_llama_config"]
