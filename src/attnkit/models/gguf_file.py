"""GGUF files (llama.cpp's single-file format): opening, typed metadata, dequantized tensors.

Nothing here knows a model family: :mod:`attnkit.models.gguf_header` parses the file's header
into compact values, this module checks it (magic, truncation, tensor shapes and placement), reads
metadata with errors that name the file and key, reads tensors' bytes with ordinary file reads (no
memory map stays open, so no page of the file stays resident) and dequantizes them to float32
through the ``gguf`` package (written by llama.cpp's authors). A family's ``gguf_checkpoint``
module maps the names and metadata of its architecture (``general.architecture``) onto its model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .gguf_header import GGUFHeader, parse_header

GGUF_MAGIC = b"GGUF"

SUPPORTED_TYPE_NAMES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
"""GGML tensor types this loader dequantizes (through ``gguf.quants.dequantize``)."""


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a GGUF file (by its ``.gguf`` suffix; the content is checked on reading)."""
    return Path(path).suffix.lower() == ".gguf"


def open_gguf(path: str | os.PathLike) -> GGUFHeader:
    """The parsed header of the GGUF file at ``path`` (:func:`~attnkit.models.gguf_header.parse_header`:
    metadata and tensor table, no tensor data, no memory map left open). Raises FileNotFoundError
    for a missing file and ValueError naming the file when it is not GGUF, is truncated or
    otherwise unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path}: not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")
    try:
        import gguf  # noqa: F401  (optional package, the llama extra: the parse and dequantizing need it)
    except ImportError:
        raise ImportError('reading GGUF files needs the gguf package: pip install -e ".[llama]"') from None
    try:
        reader = parse_header(path)
    except Exception as exc:  # ValueError, IndexError, struct.error, UnicodeDecodeError on a damaged header
        raise ValueError(f"{path}: unreadable GGUF file, truncated or damaged ({type(exc).__name__}: {exc})") from None
    for tensor in reader.tensors:
        held = max(0, min(tensor.n_bytes, reader.size - tensor.data_offset))
        if held != tensor.n_bytes:
            raise ValueError(
                f"{path}: truncated GGUF file: tensor {tensor.name} needs {tensor.n_bytes} bytes, "
                f"the file holds {held}"
            )
    _check_placement(reader, path)
    return reader


def _check_placement(reader, path: Path) -> None:
    """ValueError naming the file and tensor for a zero dimension, a tensor whose data does not
    start on the file's alignment, or two tensors sharing bytes: the reader accepts all three,
    and the model would read another tensor's bytes (NaN, or wrong numbers, later)."""
    previous = None
    for tensor in sorted(reader.tensors, key=lambda t: t.data_offset):
        shape = tuple(reversed(tensor.shape))  # GGUF lists dims innermost first
        if 0 in shape:
            raise ValueError(f"{path}: tensor {tensor.name} has a zero dimension (shape {shape})")
        offset = tensor.data_offset - reader.data_offset
        if offset % reader.alignment:
            raise ValueError(f"{path}: tensor {tensor.name} starts at data offset {offset}, "
                             f"which is not a multiple of the file's alignment {reader.alignment}")
        if previous is not None and tensor.data_offset < previous.data_offset + previous.n_bytes:
            raise ValueError(f"{path}: tensors {previous.name} and {tensor.name} overlap in the file")
        previous = tensor


def metadata(reader, path: str | os.PathLike, key: str, default=None, *, required: bool = False):
    """The value of metadata ``key`` (a Python scalar, string or list, a new list each call),
    ``default`` when absent; ValueError naming the file and key when ``required`` and absent."""
    if key not in reader.fields:
        if required:
            raise ValueError(f"{path}: GGUF metadata lacks {key}")
        return default
    return _as_python(reader.fields[key])


def _as_python(value):
    """A parsed metadata value with its numpy arrays as lists of Python numbers."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    return [_as_python(item) for item in value] if isinstance(value, list) else value


def metadata_int(reader, path, key: str, default=None, *, required: bool = False) -> Optional[int]:
    value = metadata(reader, path, key, default, required=required)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{path}: GGUF metadata {key} must be an integer, got {value!r}")
    return value


def metadata_float(reader, path, key: str, default: float) -> float:
    value = metadata(reader, path, key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{path}: GGUF metadata {key} must be a number, got {value!r}")
    # GGUF stores float32: 1e-5 reads back as 9.99999974e-06; keep the shortest decimal that
    # rounds to the same float32, which is the value the model's authors wrote.
    return float(str(np.float32(value)))


def read_rows(tensor, path: str | os.PathLike, layout: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
              *, chunk_bytes: int = 1 << 22) -> torch.Tensor:
    """The bytes of one GGUF tensor as ``(rows, row_bytes)`` uint8, read from the file into memory
    of their own, through ``layout`` (rows -> rows of the same shape, e.g. the quantized kernels'
    layout) when given.

    Ordinary reads, not a memory map: every page of a map that a copy touches would stay in the
    process's resident memory while the map lives (the whole file, at load). The file is read
    straight into the result, or, with ``layout``, ``chunk_bytes`` of whole rows at a time into
    one reused buffer and laid out into the result: a 170 MiB embedding needs 170 MiB and two
    chunks, not two or three copies of itself."""
    n_bytes = int(tensor.n_bytes)
    rows = int(np.prod([int(d) for d in tensor.shape[1:]]))
    row_bytes = n_bytes // rows
    out = torch.empty(rows, row_bytes, dtype=torch.uint8)
    step = max(1, chunk_bytes // row_bytes)
    buffer = None if layout is None else torch.empty(min(step, rows), row_bytes, dtype=torch.uint8)
    with open(path, "rb", buffering=0) as handle:
        handle.seek(int(tensor.data_offset))
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            chunk = out[start:stop] if buffer is None else buffer[:stop - start]
            if handle.readinto(chunk.numpy()) != chunk.numel():
                raise ValueError(f"{path}: tensor {tensor.name} is cut short")
            if buffer is not None:
                out[start:stop] = layout(chunk)
    return out


def dequantize(tensor, path):
    """float32 numpy array ``(rows, in)`` of one GGUF tensor (GGUF lists dims innermost first)."""
    from gguf import quants  # optional package (the llama extra), imported only when a file is read

    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPE_NAMES:
        raise ValueError(
            f"{path}: tensor {tensor.name} has type {kind}, which attnkit does not load "
            f"(supported: {', '.join(SUPPORTED_TYPE_NAMES)})"
        )
    values = quants.dequantize(tensor.data, tensor.tensor_type)  # writable: tensor.data is a copy
    return values.reshape(tuple(reversed([int(d) for d in tensor.shape])))
