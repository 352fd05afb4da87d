"""Complete models built from attnkit's attention layers, one folder per family (``llama/``,
``bert/``), recognised and loaded through :mod:`attnkit.models.registry`."""

from .bert import Bert, BertConfig
from .llama import Llama, LlamaConfig
