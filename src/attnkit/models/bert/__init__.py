"""BERT, the bidirectional encoder that ``attnkit explain`` runs by default (all-MiniLM-L6-v2).

``config`` (:class:`BertConfig`), ``model`` (:class:`Bert`, :func:`sentence_embeddings`),
``hf_checkpoint`` (the Hugging Face adapter), ``source`` (what the model registry calls).
"""

from .config import ACTIVATIONS, BertConfig
from .hf_checkpoint import default_model_dir, read_config
from .model import Bert, sentence_embeddings
from .source import LOADERS, layers_and_heads, load_bert

__all__ = ["ACTIVATIONS", "LOADERS", "Bert", "BertConfig", "default_model_dir", "layers_and_heads",
           "load_bert", "read_config", "sentence_embeddings"]
