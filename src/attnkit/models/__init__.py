"""Complete models built from attnkit's attention layers, one folder per family (``llama/``,
``bert/``), recognised and loaded through :mod:`attnkit.models.registry` and found by name through
:mod:`attnkit.models.catalog`.

``Bert``, ``BertConfig``, ``Llama`` and ``LlamaConfig`` are imported on first use, so that the
catalog answers without importing torch.
"""

from .._lazy import lazy_exports

_EXPORTS = {"Bert": "bert", "BertConfig": "bert", "Llama": "llama", "LlamaConfig": "llama"}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
