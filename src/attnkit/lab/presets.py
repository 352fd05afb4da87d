"""Named sizes of a lab comparison: model shape, sparse pattern knobs, tasks and their training.

``quick`` fits the whole comparison (8 variants x 2 tasks x 3 seeds) in a few minutes on a
2-core CPU, on one thread (its matrices are so small that a second thread only adds
synchronisation, which costs dearly on a busy machine); ``small`` and ``medium`` are meant for a GPU (``--device cuda``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..models.llama import LlamaConfig
from .tasks import MQAR, StdlibText
from .train import TrainSettings


@dataclass(frozen=True)
class ModelShape:
    """Everything of the decoder that the variants share (the vocabulary comes from the task)."""

    dim: int
    n_layers: int
    n_heads: int
    ffn_dim: int

    def base_config(self, vocab_size: int, max_positions: int) -> LlamaConfig:
        """MHA, causal, plain RoPE (theta 10000), untied head, no special tokens."""
        return LlamaConfig(
            dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads, ffn_dim=self.ffn_dim,
            vocab_size=vocab_size, rope_theta=10000.0, max_position_embeddings=max_positions,
            bos_token_id=None, eos_token_ids=(),
        )


@dataclass(frozen=True)
class Preset:
    """One comparison: shape, pattern knobs, seeds, the tasks with their settings, decode context."""

    name: str
    shape: ModelShape
    window: int
    stride: int
    summary: int
    seeds: int
    tasks: tuple = field(default_factory=tuple)  # ((task, TrainSettings), ...)
    decode_context: int = 1024
    decode_tokens: int = 32
    cpu_threads: Optional[int] = None  # None: torch's default


def _gpu_tasks(mqar: MQAR, mqar_run: tuple[int, int, int, int], text: StdlibText, text_run: tuple[int, int, int, int],
               lr: float, warmup: int, checkpoint_every: int) -> tuple:
    """The two tasks of a GPU preset, which share the optimiser schedule and checkpoint interval;
    each ``*_run`` is ``(steps, batch_size, eval_every, eval_sequences)``."""
    return tuple(
        (task, TrainSettings(steps=steps, batch_size=batch, lr=lr, warmup=warmup, eval_every=eval_every,
                             eval_sequences=eval_sequences, checkpoint_every=checkpoint_every))
        for task, (steps, batch, eval_every, eval_sequences) in ((mqar, mqar_run), (text, text_run))
    )


PRESETS: dict[str, Preset] = {
    "quick": Preset(
        "quick", ModelShape(dim=64, n_layers=2, n_heads=8, ffn_dim=128), window=8, stride=8, summary=2, seeds=3,
        tasks=(
            (MQAR(seq_len=32, n_pairs=4, n_keys=8, n_values=8),
             TrainSettings(steps=300, batch_size=32, lr=5e-3, warmup=20, eval_every=50, eval_sequences=256,
                           checkpoint_every=100)),
            (StdlibText(seq_len=64, max_bytes=1_000_000),
             TrainSettings(steps=100, batch_size=16, lr=5e-3, warmup=10, eval_every=20, eval_sequences=128,
                           checkpoint_every=50)),
        ),
        decode_context=1024, decode_tokens=32, cpu_threads=1,
    ),
    "small": Preset(
        "small", ModelShape(dim=128, n_layers=4, n_heads=8, ffn_dim=384), window=32, stride=16, summary=4, seeds=3,
        tasks=_gpu_tasks(MQAR(seq_len=128, n_pairs=16, n_keys=64, n_values=64), (3000, 64, 250, 512),
                         StdlibText(seq_len=256, max_bytes=8_000_000), (2000, 32, 200, 256),
                         lr=3e-3, warmup=100, checkpoint_every=500),
        decode_context=4096, decode_tokens=64,
    ),
    "medium": Preset(
        "medium", ModelShape(dim=256, n_layers=6, n_heads=8, ffn_dim=768), window=64, stride=32, summary=8, seeds=3,
        tasks=_gpu_tasks(MQAR(seq_len=256, n_pairs=32, n_keys=128, n_values=128), (6000, 64, 500, 1024),
                         StdlibText(seq_len=512, max_bytes=30_000_000), (5000, 32, 500, 512),
                         lr=2e-3, warmup=200, checkpoint_every=1000),
        decode_context=16384, decode_tokens=64,
    ),
}
