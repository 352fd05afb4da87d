"""The header of a GGUF file, parsed into compact Python values: metadata and where each tensor lies.

The ``gguf`` package's reader keeps the file memory-mapped and every metadata value as numpy
views of the map (two per string: SmolLM2's 100k vocabulary and merge strings hold about 75 MiB,
Gemma 3's 262k-token vocabulary about 315 MiB, and the touched pages of the map count in the
process's resident memory as long as it lives). Here the header is read once through a map that
is closed before :func:`parse_header` returns: metadata strings become ``str``, string arrays
lists of them, numeric arrays small numpy arrays, and a tensor is its name, type, shape and
byte range. Tensor bytes are read from the file when asked (:attr:`GGUFTensor.data`), with
ordinary reads, into memory of their own.

The layout (GGUF versions 2 and 3, little-endian): magic, version ``u32``, tensor and metadata
counts ``u64``; each metadata entry a key (``u64`` length + UTF-8), a value type ``u32`` and the
value (arrays: item type ``u32``, count ``u64``, items); each tensor a name, ``n_dims u32``,
dims ``u64`` (innermost first), type ``u32`` and offset ``u64`` from the data section, which
starts at the next multiple of ``general.alignment`` (32 unless given).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# GGUF value type -> struct format of its scalar (STRING = 8 and ARRAY = 9 are read apart).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
# The numpy dtype that holds the elements of a float or integer tensor; other types are bytes.
_ELEMENT_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                   "I32": np.int32, "I64": np.int64}


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: its ``name``, ``tensor_type`` (a ``gguf.GGMLQuantizationType``),
    ``shape`` (dims innermost first, as GGUF lists them), ``n_bytes`` and ``data_offset`` (from
    the start of the file) in ``path``. Holds no data."""

    path: Path
    name: str
    tensor_type: object
    shape: tuple[int, ...]
    n_bytes: int
    data_offset: int

    @property
    def data(self):
        """The tensor's bytes, read from the file now, shaped as the ``gguf`` package's reader
        shapes them: float and integer types as their elements with the dims outermost first,
        block formats as uint8 rows ``(..., row_bytes)``. Fewer bytes than ``n_bytes`` when the
        file is cut short (:func:`~attnkit.models.gguf_file.open_gguf` refuses such files)."""
        from gguf.quants import quant_shape_to_byte_shape  # optional package, present (the parse needed it)

        with open(self.path, "rb") as handle:
            handle.seek(self.data_offset)
            raw = handle.read(self.n_bytes)
        dims = tuple(reversed(self.shape))
        dtype = _ELEMENT_DTYPES.get(self.tensor_type.name)
        if dtype is None:
            dtype, dims = np.uint8, quant_shape_to_byte_shape(dims, self.tensor_type)
        values = np.frombuffer(bytearray(raw), dtype=dtype)
        return values.reshape(dims) if len(raw) == self.n_bytes else values


@dataclass(frozen=True)
class GGUFHeader:
    """A parsed GGUF file: ``fields`` (metadata key -> value: ``int``, ``float``, ``bool``, ``str``,
    a list of strings, a numpy array of numbers, or a list of such arrays), ``tensors`` in file
    order, the data section's ``alignment`` and ``data_offset``, and the file's ``size``."""

    path: Path
    fields: dict
    tensors: list[GGUFTensor]
    alignment: int
    data_offset: int
    size: int


class _Cursor:
    """Reads little-endian values from ``buffer`` forward from ``at``; IndexError past its end."""

    def __init__(self, buffer, at: int = 0) -> None:
        self.buffer, self.at = buffer, at

    def take(self, fmt: str):
        value = struct.unpack_from("<" + fmt, self.buffer, self.at)[0]
        self.at += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        size = self.take("Q")
        end = self.at + size
        if end > len(self.buffer):
            raise IndexError(f"a string of {size} bytes at offset {self.at} runs past the end")
        text = self.buffer[self.at:end].decode("utf-8")
        self.at = end
        return text

    def value(self, kind: int):
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            return self.array()
        if kind not in _SCALARS:
            raise ValueError(f"unknown metadata value type {kind} at offset {self.at - 4}")
        return self.take(_SCALARS[kind])

    def array(self):
        kind, count = self.take("I"), self.take("Q")
        if count > len(self.buffer) - self.at:  # every item takes at least one byte
            raise IndexError(f"an array of {count} items at offset {self.at} runs past the end")
        if kind in _SCALARS:
            dtype = np.dtype("<" + _SCALARS[kind])
            values = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=self.at).copy()  # no view of the map
            self.at += dtype.itemsize * count
            return values
        return [self.value(kind) for _ in range(count)]


def parse_header(path: str | os.PathLike) -> GGUFHeader:
    """The metadata and tensor table of the GGUF file at ``path`` (see the module docstring).

    Raises ValueError for a wrong magic number, an unsupported version or byte order, an unknown
    value or tensor type, duplicate tensor names or a bad alignment, and IndexError (or
    ``struct.error``, UnicodeDecodeError) for a header cut short or damaged; the caller names the
    file (:func:`~attnkit.models.gguf_file.open_gguf`).
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # optional package (the llama extra)

    path = Path(path)
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        cursor = _Cursor(buffer)
        if buffer[:4] != b"GGUF":
            raise ValueError(f"GGUF magic invalid: {bytes(buffer[:4])!r}")
        cursor.at = 4
        version = cursor.take("I")
        if version & 0xFFFF == 0:
            raise ValueError("the file is big-endian; attnkit reads little-endian GGUF files")
        if version not in SUPPORTED_VERSIONS:
            raise ValueError(f"GGUF version {version} is not supported (versions {SUPPORTED_VERSIONS})")
        n_tensors, n_fields = cursor.take("Q"), cursor.take("Q")
        fields: dict = {}
        alignment_type = None
        for _ in range(n_fields):
            key, kind = cursor.string(), cursor.take("I")
            fields[key] = cursor.value(kind)
            if key == "general.alignment":
                alignment_type = kind
        tensors, names = [], set()
        table = []
        for _ in range(n_tensors):
            name, n_dims = cursor.string(), cursor.take("I")
            dims = tuple(cursor.take("Q") for _ in range(n_dims))
            table.append((name, dims, cursor.take("I"), cursor.take("Q")))
        size = len(buffer)
        header_end = cursor.at
    alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if "general.alignment" in fields and (alignment_type != _UINT32 or alignment <= 0 or alignment & (alignment - 1)):
        raise ValueError(f"general.alignment must be a uint32 power of two, got {alignment!r}")
    data_offset = -(-header_end // alignment) * alignment
    for name, dims, raw_type, offset in table:
        if name in names:
            raise ValueError(f"two tensors are named {name}")
        names.add(name)
        kind = GGMLQuantizationType(raw_type)
        block, block_bytes = GGML_QUANT_SIZES[kind]
        if dims and dims[0] % block:
            raise ValueError(f"tensor {name}: rows of {dims[0]} values are not whole {kind.name} blocks of {block}")
        n_bytes = int(np.prod(dims, dtype=np.int64)) * block_bytes // block
        tensors.append(GGUFTensor(path, name, kind, dims, n_bytes, data_offset + offset))
    return GGUFHeader(path, fields, tensors, alignment, data_offset, size)
