"""Reading checkpoint files with errors that name the file, the field or the tensor.

One reader for every model family: which format a checkpoint path holds (:func:`checkpoint_format`;
:class:`CheckpointPath` parses a GGUF file once for all its readers), JSON configs
(:func:`read_json`, :class:`JsonFields` for typed fields), and safetensors weights, either one
``model.safetensors`` or shards listed by ``model.safetensors.index.json`` (:func:`weight_files`,
:func:`read_tensors`). Nothing here knows a model: a loader asks for the names and shapes it needs.

JSON types are strict: a boolean field takes ``true``/``false`` (not ``"false"``, which Python
would read as true), an integer field takes an integer (not ``2048.0`` or ``"2048"``), a float
field takes a finite number. ``null`` counts as absent where a field has a default.

A damaged config must fail before a model is built from it: a size beyond :data:`MAX_SIZE` is
refused (:func:`bounded_size`, which the config classes call), and the layer count is checked
against the layers whose tensors the checkpoint holds (:func:`check_layer_count`), so a
``num_hidden_layers`` of 100000 costs a glance at tensor names rather than 100000 layers.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import json
import math
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterable, Iterator, Mapping, Optional

import torch
from safetensors import safe_open
from torch.overrides import TorchFunctionMode

from .gguf_file import is_gguf, open_gguf

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
META_PARAMS_FILE = "params.json"

_REQUIRED = object()

MAX_SIZE = 2**24
"""The largest size (width, vocabulary, heads, layers) a model config may give: 16,777,216, far
above any published model (the largest widths and vocabularies are in the hundreds of
thousands), and low enough that no tensor of a model built from such sizes overflows."""


@functools.lru_cache(maxsize=1)
def c_library() -> Optional[ctypes.CDLL]:
    """The C library of this process (glibc on Linux), None where it cannot be loaded."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``; nothing on other
    C libraries). A loader's temporaries (file chunks, the rows fused projections replace) are
    freed between allocations that live on, where the heap keeps them resident; a model that
    then runs would add its own memory on top."""
    libc = c_library()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class _SkipMetaNormal(TorchFunctionMode):
    """Makes ``normal_`` (the tensor method or ``nn.init``'s) on a meta tensor a no-op: it has no
    values to fill."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.normal_, torch.nn.init.normal_):
            tensor = args[0] if args else kwargs.get("tensor")  # nn.init passes it by name
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_device() -> Iterator[None]:
    """``with meta_device(): model = Model(config)`` builds modules on the meta device (shapes, no
    memory), as ``torch.device("meta")`` does, but skips ``normal_`` (``nn.Embedding``'s
    initialisation): on a meta tensor torch runs it through a Python reference whose first call
    imports ``torch._dynamo``, which keeps about 140 MiB resident for the rest of the process."""
    with torch.device("meta"), _SkipMetaNormal():
        yield


def bounded_size(owner: str, name: str, value: int) -> int:
    """``value`` when it is at most :data:`MAX_SIZE`; ValueError naming ``owner`` and ``name``
    otherwise (a corrupt config, which would allocate gigabytes or overflow)."""
    if value > MAX_SIZE:
        raise ValueError(f"{owner}: {name} is {value}, more than {MAX_SIZE:,}, which no model has; "
                         "the config is damaged")
    return value


def check_layer_count(count: int, names: Iterable[str], pattern: str, source: str | os.PathLike, field: str) -> None:
    r"""ValueError naming ``source`` and the config ``field`` unless the tensor ``names`` hold the
    layers ``0 .. count - 1`` exactly. ``pattern`` is a regular expression matched at the start of a
    tensor name whose first group is the layer index (``r"blk\.(\d+)\."``)."""
    found = sorted({int(match[1]) for name in names if (match := re.match(pattern, name))})
    if found == list(range(count)):
        return
    if not found:
        held = "no layer tensors"
    elif found == list(range(len(found))):
        held = f"tensors for {len(found)} layers (0 to {found[-1]})"
    else:
        gap = next(i for i in range(found[-1] + 1) if i not in set(found))
        held = f"tensors for layers {found[0]} to {found[-1]} with layer {gap} missing"
    raise ValueError(f"{source}: {field} is {count}, but the checkpoint holds {held}")


def describe(value: object) -> str:
    """A JSON value as a user would recognise it in an error: ``"false" (a string)``."""
    kind = {bool: "a boolean", str: "a string", list: "a list", dict: "an object", type(None): "null",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        try:
            text = repr(value)
        except ValueError:  # an int of more than 4300 digits has no text form
            text = f"{value.bit_length()} bits long"
    text = text if len(text) <= 60 else text[:57] + "..."
    return "null" if value is None else f"{text} ({kind})"


def checkpoint_format(path: str | os.PathLike) -> str:
    """The format of the checkpoint at ``path``: ``"gguf"`` (a ``.gguf`` file), ``"hf"`` (a directory
    with ``config.json``) or ``"meta"`` (a directory with Meta's ``params.json``).

    Raises FileNotFoundError saying what is missing: the GGUF file, the directory, or a config in it.
    """
    path = Path(path)
    if is_gguf(path):
        if not path.is_file():
            raise FileNotFoundError(f"model file {path} does not exist")
        return "gguf"
    if not path.is_dir():
        what = "is not a directory (give a checkpoint directory or a .gguf file)" if path.exists() else "does not exist"
        raise FileNotFoundError(f"model directory {path} {what}")
    if (path / CONFIG_FILE).is_file():
        return "hf"
    if (path / META_PARAMS_FILE).is_file():
        return "meta"
    raise FileNotFoundError(f"model directory {path} has no {CONFIG_FILE} (nor Meta's {META_PARAMS_FILE})")


@dataclass(frozen=True)
class CheckpointPath:
    """A checkpoint's ``path`` and ``format`` (``"hf"`` or ``"gguf"``, as :func:`checkpoint_format`
    names them).

    ``gguf`` is the parsed GGUF file, read on first use and then kept: the architecture, the
    config, the tokenizer and the weights all come from that one parse. It holds the metadata as
    compact Python values and where each tensor lies, no tensor data and no memory map.
    """

    path: Path
    format: str

    @cached_property
    def gguf(self):
        """The parsed header of the file (see :func:`~attnkit.models.gguf_file.open_gguf`);
        ValueError when the checkpoint is not a GGUF file."""
        if self.format != "gguf":
            raise ValueError(f"{self.path} is a {self.format} checkpoint, not a GGUF file")
        return open_gguf(self.path)


def read_json(file: Path) -> dict:
    """The JSON object in ``file``; FileNotFoundError or ValueError naming the file."""
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file")
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file}: not valid JSON ({exc})") from None
    except ValueError as exc:  # an integer too long to convert (over 4300 digits)
        raise ValueError(f"{file}: cannot read it as JSON ({exc})") from None
    except RecursionError:
        raise ValueError(f"{file}: cannot read it as JSON (arrays or objects nested too deeply)") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: expected a JSON object, got {describe(raw)}")
    return raw


class JsonFields:
    """Typed reads of the fields of one JSON object; every error names ``source`` and the field.

    ``prefix`` names a nested object (``"rope_scaling."``) so its fields read as
    ``rope_scaling.factor``. A missing field is a ValueError unless a default is given; a value of
    the wrong type is a ValueError showing the value.
    """

    def __init__(self, raw: object, source: str | os.PathLike, prefix: str = "") -> None:
        self.source, self.prefix = str(source), prefix
        if not isinstance(raw, dict):
            what = prefix.rstrip(".") or "the file"
            raise ValueError(f"{self.source}: {what} must be a JSON object, got {describe(raw)}")
        self.raw = raw

    def __contains__(self, name: str) -> bool:
        return self.raw.get(name) is not None

    def _value(self, name: str, default: object) -> tuple[bool, object]:
        """``(found, value)``: found is False when the default applies."""
        value = self.raw.get(name)
        if value is None and (default is not _REQUIRED or name not in self.raw):
            if default is _REQUIRED:
                raise ValueError(f"{self.source}: missing field {self.prefix + name!r}")
            return False, default
        return True, value

    def _wrong(self, name: str, kind: str, value: object) -> ValueError:
        return ValueError(f"{self.source}: {self.prefix}{name} must be {kind}, got {describe(value)}")

    def integer(self, name: str, default: object = _REQUIRED) -> Optional[int]:
        found, value = self._value(name, default)
        if found and (isinstance(value, bool) or not isinstance(value, int)):
            raise self._wrong(name, "an integer", value)
        return value

    def real(self, name: str, default: object = _REQUIRED) -> Optional[float]:
        found, value = self._value(name, default)
        if not found:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._wrong(name, "a finite number", value)
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float range (1e400 written out in full)
            number = math.inf
        if not math.isfinite(number):
            raise self._wrong(name, "a finite number", value)
        return number

    def boolean(self, name: str, default: object = _REQUIRED) -> Optional[bool]:
        found, value = self._value(name, default)
        if found and not isinstance(value, bool):
            raise self._wrong(name, "true or false", value)
        return value

    def string(self, name: str, default: object = _REQUIRED) -> Optional[str]:
        found, value = self._value(name, default)
        if found and not isinstance(value, str):
            raise self._wrong(name, "a string", value)
        return value

    def strings(self, name: str, default: object = _REQUIRED) -> Optional[list[str]]:
        """A string or a list of strings, as a list (``architectures`` is written either way)."""
        found, value = self._value(name, default)
        if not found:
            return value
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) for v in items):
            raise self._wrong(name, "a string or a list of strings", value)
        return items

    def integers(self, name: str, default: object = _REQUIRED) -> Optional[list[int]]:
        """An integer or a list of integers, as a list (``eos_token_id`` takes either form)."""
        found, value = self._value(name, default)
        if not found:
            return value
        items = value if isinstance(value, list) else [value]
        if any(isinstance(v, bool) or not isinstance(v, int) for v in items):
            raise self._wrong(name, "an integer or a list of integers", value)
        return items

    def nested(self, name: str) -> Optional["JsonFields"]:
        """The nested object ``name`` (None when absent or null)."""
        value = self.raw.get(name)
        return None if value is None else JsonFields(value, self.source, f"{self.prefix}{name}.")


def _stays_inside(name: str) -> bool:
    """Does the file name ``name``, taken relative to a directory, name a file inside it? Judged
    on the name alone: the Hugging Face cache links shards to blobs elsewhere, which is fine."""
    for path in (PurePosixPath(name), PureWindowsPath(name)):
        if path.is_absolute() or path.drive or path.anchor:
            return False
    depth = 0
    for part in PurePosixPath(name.replace("\\", "/")).parts:
        depth += -1 if part == ".." else 0 if part == "." else 1
        if depth < 0:
            return False
    return depth > 0


def _index_files(index: Path) -> dict[str, Path]:
    fields = JsonFields(read_json(index), index)
    if "weight_map" not in fields:
        raise ValueError(f"{index}: missing field 'weight_map'")
    weight_map = fields.raw["weight_map"]
    if not isinstance(weight_map, dict):
        raise ValueError(
            f"{index}: weight_map must be an object of tensor name -> shard file, got {describe(weight_map)}"
        )
    files = {}
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file.strip():
            raise ValueError(f"{index}: weight_map[{name!r}] must be a shard file name, got {describe(file)}")
        if not _stays_inside(file):
            raise ValueError(
                f"{index}: weight_map[{name!r}] is {file!r}, which is outside {index.parent}; "
                "shard files must lie inside the checkpoint directory"
            )
        files[name] = index.parent / file
    for file in set(files.values()):
        if not file.is_file():
            raise FileNotFoundError(f"{index}: lists shard {file.name}, which does not exist")
    return files


def has_weights(directory: Path) -> bool:
    """Whether ``directory`` holds safetensors weights (``model.safetensors`` or an index)."""
    return (directory / INDEX_FILE).is_file() or (directory / WEIGHTS_FILE).is_file()


def weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it, from ``model.safetensors.index.json`` when the
    directory has one, else from ``model.safetensors``.

    Raises FileNotFoundError when neither exists or a listed shard is missing, ValueError naming the
    file for an invalid index (wrong field types, a shard outside ``directory``) or an unreadable
    safetensors header.
    """
    index = directory / INDEX_FILE
    if index.is_file():
        return _index_files(index)
    single = directory / WEIGHTS_FILE
    if not single.is_file():
        raise FileNotFoundError(f"{directory}: neither {WEIGHTS_FILE} nor {INDEX_FILE} found")

    try:
        with safe_open(single, framework="pt") as handle:
            return {name: single for name in handle.keys()}
    except Exception as exc:  # safetensors raises its own error type for bad headers
        raise ValueError(f"{single}: not a valid safetensors file ({exc})") from None


def check_floating(file: Path, name: str, tensor: torch.Tensor) -> None:
    """ValueError naming ``file``, the tensor and its dtype unless ``tensor`` is floating point."""
    if not tensor.dtype.is_floating_point:
        raise ValueError(
            f"{file}: tensor {name} has dtype {str(tensor.dtype).removeprefix('torch.')}; "
            "weights must be floating point"
        )


def read_tensors(
    files: Mapping[str, Path],
    names: Iterable[str],
    *,
    shapes: Optional[Mapping[str, torch.Size]] = None,
    dtype: Optional[torch.dtype] = None,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Read tensors ``names`` from their files (``files`` as :func:`weight_files` gives it).

    Each must be floating point and, when ``shapes`` names it, of that shape; it is cast to
    ``dtype`` (None keeps the file's) and moved to ``device``. Raises ValueError naming the file
    and tensor otherwise, or naming the file when it cannot be read (truncated, corrupt).
    """
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    out = {}
    for file, wanted in by_file.items():
        try:
            handle_context = safe_open(file, framework="pt")
        except Exception as exc:  # safetensors raises its own error type for bad headers
            raise ValueError(f"{file}: not a valid safetensors file ({exc})") from None
        with handle_context as handle:
            present = set(handle.keys())
            for name in wanted:
                if name not in present:
                    raise ValueError(f"{file}: tensor {name} is listed in the index but not in the file")
                try:
                    tensor = handle.get_tensor(name)
                except Exception as exc:  # truncated or corrupt data
                    raise ValueError(f"{file}: cannot read tensor {name} ({exc})") from None
                check_floating(file, name, tensor)
                if shapes is not None and name in shapes and tensor.shape != shapes[name]:
                    raise ValueError(
                        f"{file}: tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(shapes[name])}"
                    )
                out[name] = tensor.to(device=device, dtype=dtype or tensor.dtype)
    return out


# attnkit name -> Hugging Face name: the per-layer names every decoder here shares, and the rest.
HF_DECODER_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
_HF_TOP_NAMES = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                 "lm_head.weight": "lm_head.weight"}
_LAYER_PARAMETER = re.compile(r"layers\.(\d+)\.(.+)")


def hf_decoder_name(name: str, layer_names: Mapping[str, str]) -> str:
    """The Hugging Face tensor name of a decoder's attnkit parameter ``name``: a layer's through
    ``layer_names`` (its name inside the layer -> Hugging Face's), the embedding, final norm and
    head by their fixed names. KeyError for a name the model does not have."""
    match = _LAYER_PARAMETER.fullmatch(name)
    if match:
        return f"model.layers.{match[1]}.{layer_names[match[2]]}"
    return _HF_TOP_NAMES[name]


def read_named_tensors(
    directory: Path,
    names: Mapping[str, str],
    shapes: Mapping[str, torch.Size],
    *,
    ignored: Iterable[str] = (),
    dtype: Optional[torch.dtype] = None,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """A model's tensors from the safetensors of ``directory``: ``names`` maps each of the model's
    parameter names to the name the files use, ``shapes`` gives each parameter's shape. Returns
    them under the model's names, cast to ``dtype`` (None keeps the file's) on ``device``.

    The files must hold exactly those tensors, apart from the file names in ``ignored`` (a tied
    head a checkpoint may still carry). Raises FileNotFoundError for missing files and ValueError
    naming the directory or file for missing, unexpected, mis-shaped or non-floating-point
    tensors, unreadable files, and index entries that are not file names inside ``directory``.
    """
    in_file = {names[name]: name for name in shapes}
    file_shapes = {names[name]: shape for name, shape in shapes.items()}
    files = weight_files(directory)
    missing = sorted(set(file_shapes) - set(files))
    if missing:
        raise ValueError(f"{directory}: missing tensors {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    unexpected = sorted(set(files) - set(file_shapes) - set(ignored))
    if unexpected:
        raise ValueError(
            f"{directory}: unexpected tensors {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}"
        )
    tensors = read_tensors(files, file_shapes, shapes=file_shapes, dtype=dtype, device=torch.device(device))
    return {in_file[name]: tensor for name, tensor in tensors.items()}
