"""The check that every rank of a ring call passes the same problem: one tiny exchange per call.

Ranks that disagree (another shard length, dtype, layout, scale or pattern) would run and return
wrong results without any error, so each call first passes a fingerprint of its settings around
the ring and every rank compares them; all ranks see the same table, so all raise together. Only
when they differ is a second exchange made, carrying each rank's pattern as text for the message.

A pattern's fingerprint is a hash of its structure (class and fields, tensors by content,
functions by module and qualified name) and of what it allows on a fixed sample of position
pairs, so two ``Predicate`` s built from the same lambda with different captured values differ too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

import torch

from ..patterns import Pattern
from .comm import RingComm
from .layouts import LAYOUTS

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_PROBE_PAIRS = 256
_TEXT_BYTES = 160  # pattern text carried for the error message
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _structure(value: object) -> str:
    """Text that is equal on every process for equal values (no memory addresses, no truncation)."""
    if isinstance(value, Pattern) and dataclasses.is_dataclass(value):
        parts = [f"{f.name}={_structure(getattr(value, f.name))}" for f in dataclasses.fields(value) if f.init]
        return f"{type(value).__name__}({', '.join(parts)})"
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        return f"tensor{tuple(value.shape)}:{value.dtype}:{hashlib.blake2b(data, digest_size=8).hexdigest()}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_structure(item) for item in value) + ")"
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '?')}.{value.__qualname__}"
    return _ADDRESS.sub("", repr(value))


def _probe(pattern: Pattern, seq_len: int, device: torch.device) -> bytes:
    """What ``pattern`` allows on a fixed sample of pairs: random ones and ones near the diagonal."""
    generator = torch.Generator().manual_seed(0)
    half = _PROBE_PAIRS // 2
    i = torch.randint(0, seq_len, (_PROBE_PAIRS,), generator=generator)
    far = torch.randint(0, seq_len, (half,), generator=generator)
    near = (i[half:] - torch.randint(-8, 64, (half,), generator=generator)).clamp(0, seq_len - 1)
    allowed = pattern.allows(i.to(device), torch.cat([far, near]).to(device))
    return allowed.cpu().contiguous().numpy().tobytes()


def pattern_fingerprint(pattern: Pattern, seq_len: int, device: torch.device = torch.device("cpu")) -> int:
    """A signed 64-bit hash of ``pattern``'s structure and behaviour on ``seq_len`` positions."""
    probe = _probe(pattern, max(seq_len, 1), device)
    digest = hashlib.blake2b(_structure(pattern).encode() + probe, digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _text_tensor(text: str) -> torch.Tensor:
    data = text.encode()[:_TEXT_BYTES].ljust(_TEXT_BYTES, b"\0")
    return torch.tensor(list(data), dtype=torch.int64)


def _text(row: torch.Tensor) -> str:
    return bytes(row.tolist()).rstrip(b"\0").decode(errors="replace")


def check_same_everywhere(comm: RingComm, q, k, v, pattern: Pattern, layout: str, scale: float) -> None:
    """Raise ValueError on every rank unless all ranks hold shards of one shape and dtype, in one
    layout, with one scale and one pattern. Costs 13 int64 values passed around the ring."""
    seq_len = q.shape[2] * comm.size
    device = q.device if q.is_cuda else torch.device("cpu")  # NCCL moves CUDA tensors only
    mine = [*q.shape, *k.shape, v.shape[-1], _DTYPES.index(q.dtype), LAYOUTS.index(layout),
            round(scale * 2**40), pattern_fingerprint(pattern, seq_len, q.device)]
    what = "the agreement check (shapes, dtype, layout, scale, pattern)"
    every = comm.all_gather_small(torch.tensor(mine, device=device), what).cpu()
    if bool((every == every[0]).all()):
        return
    # Every rank holds the same table, so every rank takes the same branch (and the same exchanges).
    if bool((every[:, :-1] == every[0, :-1]).all()):
        text = _text_tensor(_ADDRESS.sub("", repr(pattern))).to(device)
        texts = comm.all_gather_small(text, "the pattern comparison").cpu()
        r = next(r for r in range(comm.size) if every[r, -1] != every[comm.rank, -1])
        raise ValueError(
            f"ring_attention: ranks pass different patterns: rank {comm.rank} has {_text(texts[comm.rank])}, "
            f"rank {r} has {_text(texts[r])}; every rank must pass the same pattern"
        )
    # Not all equal, so this rank differs from at least one other.
    r = next(r for r in range(comm.size) if not torch.equal(every[r, :-1], every[comm.rank, :-1]))
    other = every[r].tolist()
    raise ValueError(
        f"ring_attention: shards differ across ranks: rank {comm.rank} has q {tuple(q.shape)}, "
        f"k {tuple(k.shape)}, {q.dtype}, layout {layout!r}, but rank {r} has "
        f"q {tuple(other[:4])}, k {tuple(other[4:8])}, {_DTYPES[other[9]]}, "
        f"layout {LAYOUTS[other[10]]!r}{'' if other[11] == mine[11] else ', another scale'}"
    )
