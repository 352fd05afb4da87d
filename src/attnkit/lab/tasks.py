"""The lab's two tasks, both generated or read offline: associative recall and byte-level Python.

A task hands out ``(inputs, targets)`` batches of token ids ``(B, N)``; a target of ``IGNORE``
(-100) is not scored. Batch ``k`` of a run with seed ``s`` is a pure function of ``(s, k)``, so an
interrupted run resumes with exactly the data it would have seen.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..checks import positive_int

IGNORE = -100


def batch_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for batch ``step`` of the run seeded ``seed`` (``stream`` separates uses)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + stream)


@dataclass(frozen=True)
class MQAR:
    """Multi-query associative recall (Arora et al. 2023, "Zoology").

    Each sequence of ``seq_len`` tokens opens with ``n_pairs`` key-value pairs ``k1 v1 k2 v2 ...``
    (distinct keys), then filler tokens, and ends with the same keys queried in a random order,
    each followed by its value: ``... q1 a1 q2 a2 ...``. Only the values after a query are scored
    (accuracy = fraction of queried values predicted exactly). The filler puts the first query
    ``seq_len - 4 * n_pairs + 1`` tokens after the last pair, so a short window cannot bridge it.

    Vocabulary: 0 = filler, keys ``1 .. n_keys``, values ``n_keys + 1 .. n_keys + n_values``.
    """

    seq_len: int = 32
    n_pairs: int = 4
    n_keys: int = 16
    n_values: int = 16

    def __post_init__(self) -> None:
        for name in ("seq_len", "n_pairs", "n_keys", "n_values"):
            positive_int("MQAR", name, getattr(self, name))
        if self.n_pairs > self.n_keys:
            raise ValueError(f"MQAR: n_pairs ({self.n_pairs}) cannot exceed n_keys ({self.n_keys}): keys are distinct")
        if 4 * self.n_pairs > self.seq_len:
            raise ValueError(f"MQAR: seq_len ({self.seq_len}) must hold 4 * n_pairs = {4 * self.n_pairs} tokens")

    name = "mqar"
    metric = "accuracy"

    @property
    def vocab_size(self) -> int:
        return 1 + self.n_keys + self.n_values

    def sequences(self, generator: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens (B, seq_len), targets (B, seq_len))``: ``targets[b, t]`` is the value the model
        must predict after reading ``tokens[b, : t + 1]`` (a query position), else ``IGNORE``."""
        p, n = self.n_pairs, self.seq_len
        keys = torch.rand(batch, self.n_keys, generator=generator).argsort(-1)[:, :p] + 1  # distinct per row
        values = torch.randint(self.n_keys + 1, self.vocab_size, (batch, p), generator=generator)
        order = torch.rand(batch, p, generator=generator).argsort(-1)
        tokens = torch.zeros(batch, n, dtype=torch.long)
        targets = torch.full((batch, n), IGNORE, dtype=torch.long)
        tokens[:, 0 : 2 * p : 2], tokens[:, 1 : 2 * p : 2] = keys, values
        start = n - 2 * p
        tokens[:, start::2] = keys.gather(1, order)
        tokens[:, start + 1 :: 2] = values.gather(1, order)
        targets[:, start::2] = tokens[:, start + 1 :: 2]
        return tokens, targets

    def batch(self, seed: int, step: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sequences(batch_generator(seed, step), batch)

    def validation(self, n_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed held-out set (its own generator stream, the same for every seed and variant)."""
        return self.sequences(batch_generator(0, 0, stream=1), n_sequences)

    def describe(self) -> dict:
        return {"name": self.name, "seq_len": self.seq_len, "n_pairs": self.n_pairs,
                "n_keys": self.n_keys, "n_values": self.n_values}


def stdlib_files(root: Optional[Path] = None) -> list[Path]:
    """The ``*.py`` files directly in the Python standard library directory, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else Path(root)
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no Python source files found in {root}")
    return files


def is_validation_file(path: Path, every: int = 10) -> bool:
    """One file in ``every`` goes to validation, chosen by a hash of its name (stable across runs)."""
    return int(hashlib.sha256(path.name.encode()).hexdigest(), 16) % every == 0


@dataclass(frozen=True)
class StdlibText:
    """Byte-level language modelling on the standard library's own source, split by file.

    Train and validation texts are the concatenated bytes of their files (at most ``max_bytes``
    each, taken file by file in name order). Training windows of ``seq_len + 1`` bytes start at
    random offsets; validation uses ``n`` evenly spaced windows. Loss is in nats per byte.
    """

    seq_len: int = 128
    max_bytes: int = 2_000_000
    root: Optional[str] = None

    name = "stdlib-bytes"
    metric = "loss"
    vocab_size = 256

    def __post_init__(self) -> None:
        positive_int("StdlibText", "seq_len", self.seq_len)
        positive_int("StdlibText", "max_bytes", self.max_bytes)

    def _corpus(self, validation: bool) -> torch.Tensor:
        chunks, size = [], 0
        for path in stdlib_files(None if self.root is None else Path(self.root)):
            if is_validation_file(path) != validation:
                continue
            data = path.read_bytes()[: self.max_bytes - size]
            chunks.append(data)
            size += len(data)
            if size >= self.max_bytes:
                break
        corpus = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).long()
        if corpus.numel() <= self.seq_len + 1:
            raise ValueError(f"StdlibText: the {'validation' if validation else 'training'} text is too short")
        return corpus

    def texts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Train and validation byte tensors (cached on the instance)."""
        cached = self.__dict__.get("_texts")
        if cached is None:
            cached = (self._corpus(False), self._corpus(True))
            object.__setattr__(self, "_texts", cached)
        return cached

    def _windows(self, text: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = starts[:, None] + torch.arange(self.seq_len + 1)
        windows = text[index]
        return windows[:, :-1], windows[:, 1:]

    def batch(self, seed: int, step: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        train, _ = self.texts()
        starts = torch.randint(0, train.numel() - self.seq_len - 1, (batch,), generator=batch_generator(seed, step))
        return self._windows(train, starts)

    def validation(self, n_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
        _, val = self.texts()
        starts = torch.linspace(0, val.numel() - self.seq_len - 1, n_sequences).long()
        return self._windows(val, starts)

    def describe(self) -> dict:
        train, val = self.texts()
        return {"name": self.name, "seq_len": self.seq_len, "train_bytes": train.numel(),
                "val_bytes": val.numel(), "stdlib": sysconfig.get_paths()["stdlib"] if self.root is None else self.root}
