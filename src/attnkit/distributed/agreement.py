"""The check that every rank of a sequence-parallel call passes the same, valid problem: one tiny
exchange per call (per stage of a hybrid grid).

Ranks that disagree (another shard length, dtype, layout, scale, pattern, scheme or grid) would run and return
wrong results without any error, so each call first sends every other rank a fingerprint of its
settings (:data:`ROW_INTS` integers, point to point) and every rank compares the table; all ranks see the same
table, so all raise together. A rank whose own arguments are invalid (a bad scale, a pattern made
for another length) still takes part, with a marker in place of its fingerprint, so that the
others raise as well instead of losing it. Only when something is wrong is a second exchange made,
carrying each rank's error or pattern as text for the message.

A pattern's fingerprint hashes its structure and what it allows on a sample of position pairs.
The structure is its class and fields, tensors by content, and functions by their code (bytecode,
constants, names used) together with their defaults and the values they captured (closure cells,
a bound method's object, a ``functools.partial``'s arguments), recursively; so two ``Predicate`` s
made by one lambda with different captured values differ. The sample holds random pairs, pairs near
the diagonal, and pairs at distances 1, 2, 4, ... N (and one either side of each) in both
directions. A callable whose state is out of reach of all this (a global it reads, a C extension)
is told apart only by that sample: best effort.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
import struct
import types
import weakref
from typing import Optional, Sequence

import numpy
import torch

from ..backends import check_pattern
from ..checks import check_inputs, check_scale
from ..patterns import Pattern
from .comm import RingComm
from .layouts import LAYOUTS, check_layout

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_PROBE_PAIRS = 256
_TEXT_BYTES = 400  # pattern or error text carried for the message
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_DEPTH = 8  # how deep captured values are followed (and where a reference cycle stops)
_OK, _INVALID = 0, 1

# id(tensor) -> (weak reference, version key, digest): hashing a large block layout on every call
# would copy it each time; the version counter moves with every in-place change.
_digests: dict[int, tuple[weakref.ref, tuple, str]] = {}


def _forget(key: int, ref: weakref.ref) -> None:
    if _digests.get(key, (None,))[0] is ref:
        del _digests[key]


def _tensor_digest(tensor: torch.Tensor) -> str:
    """``tensor(shape):dtype:hash`` of the contents, cached per tensor object and version."""
    cacheable = not tensor.is_inference()  # inference tensors keep no version counter
    if cacheable:
        version = (tensor._version, tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype, tensor.device)
        cached = _digests.get(id(tensor))
        if cached is not None and cached[0]() is tensor and cached[1] == version:
            return cached[2]
    data = tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
    digest = f"tensor{tuple(tensor.shape)}:{tensor.dtype}:{hashlib.blake2b(data, digest_size=8).hexdigest()}"
    if cacheable:
        key = id(tensor)
        _digests[key] = (weakref.ref(tensor, lambda ref: _forget(key, ref)), version, digest)
    return digest


def _code(code: types.CodeType, depth: int) -> str:
    consts = ", ".join(_structure(c, depth) for c in code.co_consts)
    return f"code({code.co_code.hex()}; {consts}; {','.join(code.co_names)})"


def _function(fn: types.FunctionType, depth: int) -> str:
    cells = []
    for cell in fn.__closure__ or ():
        try:
            cells.append(_structure(cell.cell_contents, depth))
        except ValueError:  # a cell not yet assigned
            cells.append("<empty>")
    return (
        f"{fn.__module__}.{fn.__qualname__}[{_code(fn.__code__, depth)}; "
        f"defaults {_structure(fn.__defaults__, depth)}; kwdefaults {_structure(fn.__kwdefaults__, depth)}; "
        f"captured ({', '.join(cells)})]"
    )


def _structure(value: object, depth: int = 0) -> str:
    """Text that is equal on every process for equal values (no memory addresses, no truncation)."""
    if depth > _DEPTH:
        return "..."
    depth += 1
    if isinstance(value, types.BuiltinFunctionType) and not isinstance(value.__self__, (types.ModuleType, type(None))):
        return f"builtin {value.__qualname__} of {_structure(value.__self__, depth)}"  # e.g. a tensor's method
    if isinstance(value, Pattern) and dataclasses.is_dataclass(value):  # a finite tree: no depth spent
        fields = [f for f in dataclasses.fields(value) if f.init]
        parts = [f"{f.name}={_structure(getattr(value, f.name), depth - 1)}" for f in fields]
        return f"{type(value).__name__}({', '.join(parts)})"
    if isinstance(value, torch.Tensor):
        return _tensor_digest(value)
    if isinstance(value, numpy.ndarray):
        return _tensor_digest(torch.from_numpy(numpy.ascontiguousarray(value)))
    if isinstance(value, (tuple, list, set, frozenset)):
        items = [_structure(item, depth) for item in value]
        return "(" + ", ".join(sorted(items) if isinstance(value, (set, frozenset)) else items) + ")"
    if isinstance(value, dict):
        items = sorted(f"{_structure(k, depth)}: {_structure(v, depth)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    if isinstance(value, types.FunctionType):
        return _function(value, depth)
    if isinstance(value, types.MethodType):
        return f"method {_structure(value.__func__, depth)} of {_structure(value.__self__, depth)}"
    if isinstance(value, functools.partial):
        parts = (_structure(part, depth) for part in (value.func, value.args, value.keywords))
        return f"partial({', '.join(parts)})"
    if isinstance(value, types.CodeType):
        return _code(value, depth)
    if isinstance(value, (type, types.ModuleType, types.BuiltinFunctionType)):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', value.__name__)}"
    if not isinstance(value, (int, float, complex, str, bytes)) and hasattr(value, "__dict__"):
        kind = type(value)  # an object with state, e.g. a callable object or a method's owner
        return f"{kind.__module__}.{kind.__qualname__}({_structure(vars(value), depth)})"
    return _ADDRESS.sub("", repr(value))


def _probe(pattern: Pattern, seq_len: int, device: torch.device) -> bytes:
    """What ``pattern`` allows on a fixed sample of pairs: random ones, ones near the diagonal, and
    ones at distances 1, 2, 4, ... (and one either side) both ways, so that a window or a stride
    that differs by one is seen at any length."""
    generator = torch.Generator().manual_seed(0)
    half = _PROBE_PAIRS // 2
    i = torch.randint(0, seq_len, (_PROBE_PAIRS,), generator=generator)
    far = torch.randint(0, seq_len, (half,), generator=generator)
    near = (i[half:] - torch.randint(-8, 64, (half,), generator=generator)).clamp(0, seq_len - 1)
    j = torch.cat([far, near])
    powers = [1 << p for p in range(seq_len.bit_length())]
    distances = torch.tensor(sorted({d + e for d in powers for e in (-1, 0, 1) if 0 <= d + e < seq_len}))
    last, anywhere = torch.full_like(distances, seq_len - 1), torch.randint(0, seq_len, distances.shape, generator=generator)
    for anchor in (last, anywhere):
        later, earlier = anchor.clamp(min=distances), anchor.clamp(min=distances) - distances
        i, j = torch.cat([i, later, earlier]), torch.cat([j, earlier, later])
    allowed = pattern.allows(i.to(device), j.to(device))
    return allowed.cpu().contiguous().numpy().tobytes()


def pattern_fingerprint(pattern: Pattern, seq_len: int, device: torch.device = torch.device("cpu")) -> int:
    """A signed 64-bit hash of ``pattern``'s structure and behaviour on ``seq_len`` positions."""
    probe = _probe(pattern, max(seq_len, 1), device)
    digest = hashlib.blake2b(_structure(pattern).encode() + probe, digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _text_tensor(text: str, device: torch.device) -> torch.Tensor:
    data = text.encode()[:_TEXT_BYTES].ljust(_TEXT_BYTES, b"\0")
    return torch.tensor(list(data), dtype=torch.uint8, device=device)


def _text(row: torch.Tensor) -> str:
    return bytes(row.tolist()).rstrip(b"\0").decode(errors="replace")


def _float_bits(value: float) -> int:
    """The float64 bit pattern of ``value`` as an int64: exact, and no overflow for any scale."""
    return struct.unpack("<q", struct.pack("<d", value))[0]


SCHEMES = ("ring", "ulysses", "hybrid")
RING, ULYSSES, HYBRID = range(3)
ROW_INTS = 17
"""Integers in one rank's fingerprint row: what every call sends each peer of each stage."""


def checked_arguments(q, k, v, pattern, layout, scale) -> tuple[Pattern, float, Optional[Exception]]:
    """``(pattern, scale, problem)``: the checked pattern and scale of this rank's call, and the
    TypeError / ValueError its arguments raise (None when valid), which
    :func:`check_same_everywhere` raises on every rank."""
    try:
        check_inputs(q, k, v)
        scale = check_scale(scale, q.shape[-1])
        pattern = check_pattern(pattern, q.shape[1])
        check_layout(layout)
    except (TypeError, ValueError) as exc:
        return pattern, scale, exc
    return pattern, scale, None


def _fingerprint_row(q, k, v, pattern, layout, scale, scheme: int, grid: tuple[int, int]) -> list[int]:
    seq_len = q.shape[2] * grid[0] * grid[1]
    pattern.validate(seq_len, seq_len)
    return [_OK, *q.shape, *k.shape, v.shape[-1], _DTYPES.index(q.dtype), LAYOUTS.index(layout),
            _float_bits(scale), scheme, *grid, pattern_fingerprint(pattern, seq_len, q.device)]


def _describe(row: list[int]) -> str:
    return f"q {tuple(row[1:5])}, k {tuple(row[5:9])}, {_DTYPES[row[10]]}, layout {LAYOUTS[row[11]]!r}"


def _scheme(row: list[int]) -> str:
    return f"{SCHEMES[row[13]]} (ulysses degree {row[14]}, ring degree {row[15]})"


class _Heard(ValueError):
    """Another rank's fault, as this rank learnt it: ``origin`` is ``"global rank|error text"``,
    passed on unchanged to the next stage."""

    def __init__(self, caller: str, origin: str):
        rank, _, text = origin.partition("|")
        super().__init__(f"{caller}: rank {rank} cannot take part: {text}")
        self.origin = origin


def _origin(comm: RingComm, problem: Exception) -> str:
    if isinstance(problem, _Heard):
        return problem.origin
    return f"{comm.global_rank(comm.rank)}|{type(problem).__name__}: {problem}"


def _stage(comm: RingComm, mine: list[int], problem: Optional[Exception], pattern, caller: str, device) -> Optional[Exception]:
    """One exchange of fingerprint rows among the ranks of ``comm``: the error this rank must
    raise (its own ``problem``, or what it learnt of another rank), or None. Every rank of
    ``comm`` sees the same table, so all take the same branch and the same exchanges."""
    what = "the agreement check (shapes, dtype, layout, scale, pattern, scheme)"
    every = comm.all_gather_small(torch.tensor(mine, device=device), what).cpu()
    if bool((every[:, 0] == _INVALID).any()):
        text = "" if problem is None else _origin(comm, problem)
        texts = comm.all_gather_small(_text_tensor(text, device), "the error exchange").cpu()
        if problem is not None:
            return problem
        r = next(r for r in range(comm.size) if every[r, 0] == _INVALID)
        return _Heard(caller, _text(texts[r]))
    if bool((every == every[0]).all()):
        return None
    me = comm.rank
    if bool((every[:, :-1] == every[0, :-1]).all()):
        text = _text_tensor(_ADDRESS.sub("", repr(pattern)), device)
        texts = comm.all_gather_small(text, "the pattern comparison").cpu()
        r = next(r for r in range(comm.size) if every[r, -1] != every[me, -1])
        return ValueError(
            f"{caller}: ranks pass different patterns: rank {comm.global_rank(me)} has {_text(texts[me])}, "
            f"rank {comm.global_rank(r)} has {_text(texts[r])}; every rank must pass the same pattern"
        )
    # Not all equal, so this rank differs from at least one other.
    r = next(r for r in range(comm.size) if not torch.equal(every[r, :-1], every[me, :-1]))
    other, mine_row = every[r].tolist(), every[me].tolist()
    if other[13:16] != mine_row[13:16]:
        return ValueError(
            f"{caller}: ranks run different schemes: rank {comm.global_rank(me)} runs {_scheme(mine_row)}, "
            f"rank {comm.global_rank(r)} runs {_scheme(other)}"
        )
    return ValueError(
        f"{caller}: shards differ across ranks: rank {comm.global_rank(me)} has {_describe(mine_row)}, "
        f"but rank {comm.global_rank(r)} has {_describe(other)}{'' if other[12] == mine_row[12] else ', another scale'}"
    )


def check_same_everywhere(
    comms: Sequence[RingComm], q, k, v, pattern, layout, scale, problem: Optional[Exception] = None,
    *, caller: str = "ring_attention", scheme: int = RING, grid: Optional[tuple[int, int]] = None,
) -> None:
    """Raise on every rank unless every rank's arguments are valid and all ranks hold shards of one
    shape and dtype, in one layout, with one scale, one pattern, one scheme and one grid.

    ``comms`` are the stages: the ranks of each stage exchange rows (:data:`ROW_INTS` int64 values
    to every other rank of the stage). One stage (the ring's or Ulysses' group) compares every rank
    with every other; a hybrid grid passes its Ulysses group, then its ring group: each ring group
    holds one rank of every Ulysses group, so a difference anywhere reaches every rank, and a rank
    whose first stage failed takes part in the second with a marker, so the others raise with it.
    ``grid`` is ``(ulysses degree, ring degree)`` (default: a ring over the one stage).

    ``problem`` is the error this rank's own checks of its arguments raised, if any: this rank then
    raises it, and every other rank a ValueError naming this rank (its global rank) and its error.
    Otherwise the arguments are the checked ones (``pattern`` a Pattern, ``scale`` a float). A
    pattern that fails its fingerprint here (its ``allows`` raises) counts as such a problem too.
    """
    device = q.device if isinstance(q, torch.Tensor) and q.is_cuda else torch.device("cpu")  # NCCL: CUDA only
    grid = grid or (1, comms[0].size)
    mine = [_INVALID] + [0] * (ROW_INTS - 1)
    if problem is None:
        try:
            mine = _fingerprint_row(q, k, v, pattern, layout, scale, scheme, grid)
        except Exception as exc:  # a user Predicate may raise anything; the other ranks must still hear
            problem = exc
    for comm in comms:
        problem = _stage(comm, mine, problem, pattern, caller, device) or problem
        if problem is not None:
            mine = [_INVALID] + [0] * (ROW_INTS - 1)
    if isinstance(problem, _Heard):
        raise ValueError(str(problem))
    if problem is not None:
        raise problem
