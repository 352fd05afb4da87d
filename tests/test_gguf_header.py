"""attnkit's GGUF header parser (models/gguf_header.py) reads what the gguf package's reader reads."""

from __future__ import annotations

import struct

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from attnkit.models.gguf_file import metadata, open_gguf  # noqa: E402
from attnkit.models.gguf_header import parse_header  # noqa: E402

T = gguf.GGMLQuantizationType

VALUES = {
    "u8": (gguf.GGUFWriter.add_uint8, 200), "i8": (gguf.GGUFWriter.add_int8, -100),
    "u16": (gguf.GGUFWriter.add_uint16, 60000), "i16": (gguf.GGUFWriter.add_int16, -30000),
    "u32": (gguf.GGUFWriter.add_uint32, 4_000_000_000), "i32": (gguf.GGUFWriter.add_int32, -2_000_000_000),
    "u64": (gguf.GGUFWriter.add_uint64, 2**63 + 5), "i64": (gguf.GGUFWriter.add_int64, -(2**62)),
    "f32": (gguf.GGUFWriter.add_float32, 1e-5), "f64": (gguf.GGUFWriter.add_float64, 1e-300),
    "flag": (gguf.GGUFWriter.add_bool, True), "text": (gguf.GGUFWriter.add_string, "héllo ▁ wörld"),
    "words": (gguf.GGUFWriter.add_array, ["a", "", "ÿ space", "<|im_end|>"]),
    "ints": (gguf.GGUFWriter.add_array, [3, 1, 4, 1, 5]), "floats": (gguf.GGUFWriter.add_array, [0.5, -2.25]),
}


def _write(path, tensors, values=VALUES):
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, (add, value) in values.items():
        add(writer, key if "." in key else f"test.{key}", value)
    for name, array, kind in tensors:
        writer.add_tensor(name, array, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tensors():
    rng = np.random.default_rng(0)
    q8 = gguf.quants.quantize(rng.standard_normal((6, 64)).astype(np.float32), T.Q8_0)
    return [("a", rng.standard_normal((3, 5)).astype(np.float32), None), ("b", q8, T.Q8_0),
            ("c", rng.standard_normal(7).astype(np.float16), None)]


def test_metadata_and_tensors_equal_the_gguf_readers(tmp_path):
    path = _write(tmp_path / "m.gguf", _tensors())
    ours, theirs = open_gguf(path), gguf.GGUFReader(path)
    keys = [key for key in theirs.fields if not key.startswith("GGUF.")]
    assert keys == list(ours.fields)
    for key in keys:
        value = metadata(ours, path, key)
        assert value == theirs.fields[key].contents() and type(value) is type(theirs.fields[key].contents()), key
    assert metadata(ours, path, "test.ints") is not metadata(ours, path, "test.ints")  # a new list each call
    assert ours.alignment == theirs.alignment and ours.data_offset == theirs.data_offset
    for mine, other in zip(ours.tensors, theirs.tensors, strict=True):
        assert (mine.name, mine.tensor_type, mine.shape, mine.n_bytes, mine.data_offset) == (
            other.name, other.tensor_type, tuple(other.shape.tolist()), other.n_bytes, other.data_offset)
        assert mine.data.dtype == other.data.dtype and np.array_equal(mine.data, other.data)
        assert mine.data.flags.writeable


def test_the_parse_keeps_no_memory_map_open(tmp_path):
    path = _write(tmp_path / "m.gguf", _tensors())
    parsed = parse_header(path)
    assert str(path) not in open("/proc/self/maps").read()
    assert parsed.tensors[0].shape == (5, 3) and parsed.tensors[0].data.shape == (3, 5)


def _patched(path, old: bytes, new: bytes):
    data = path.read_bytes()
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, new))
    return path


def test_damaged_headers_are_refused_naming_the_file(tmp_path):
    good = _write(tmp_path / "good.gguf", _tensors())
    raw = good.read_bytes()
    cases = {
        "big.gguf": (raw[:4] + struct.pack(">I", 3) + raw[8:], "big-endian"),
        "v1.gguf": (raw[:4] + struct.pack("<I", 1) + raw[8:], "GGUF version 1 is not supported"),
        "cut.gguf": (raw[:150], "truncated or damaged"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"{name}: unreadable GGUF file.*{message}"):
            open_gguf(tmp_path / name)
    twice = _write(tmp_path / "twice.gguf", [("a", np.zeros(4, np.float32), None), ("b", np.zeros(4, np.float32), None)])
    _patched(twice, b"\x01\x00\x00\x00\x00\x00\x00\x00b", b"\x01\x00\x00\x00\x00\x00\x00\x00a")
    with pytest.raises(ValueError, match="twice.gguf: .*two tensors are named a"):
        open_gguf(twice)
    for name, add, value in (("three.gguf", gguf.GGUFWriter.add_uint32, 3), ("float.gguf", gguf.GGUFWriter.add_float32, 32.0)):
        _write(tmp_path / name, [("a", np.zeros(4, np.float32), None)], {"general.alignment": (add, value)})
        with pytest.raises(ValueError, match=f"{name}: .*general.alignment must be a uint32 power of two"):
            open_gguf(tmp_path / name)
