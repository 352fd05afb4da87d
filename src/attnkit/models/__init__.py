"""Complete models built from attnkit's attention layers, loading Hugging Face checkpoints."""

from .bert import Bert, BertConfig
from .llama import Llama, LlamaConfig
