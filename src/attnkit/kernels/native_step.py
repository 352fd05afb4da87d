"""The ctypes side of the native decoding step (``csrc/decode_step.c``): the plan it reads and the call.

A :class:`StepPlan` is the C ``ds_model`` (model sizes, the embedding, the head, the final norm,
one ``ds_layer`` per layer) filled from :class:`LinearSpec` and :class:`LayerSpec` values, which
name the torch tensors the C code reads and writes in place: quantized blocks, float32 weights,
the caches' ``keys``, ``values`` and ``positions`` buffers. The plan keeps a reference to every
one of them, so the addresses it hands to C stay valid while it lives. The quantized products are
the exported ``gguf_matmul`` and ``gguf_dequantize`` of ``csrc/gguf_matmul.c``, whose addresses
the plan passes along (the step calls them from C; one library, one thread pool).

:mod:`attnkit.models.native_step` builds the specs from a Llama or Gemma 3 model; this module knows
nothing of models.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .native_build import add_status_note, load_native
from .quant_native import FORMATS, _library as _quant_library, kernel_threads

_SOURCE = "decode_step"
FLOAT_WEIGHT = -1
FAMILIES = {"llama": 0, "gemma3": 1}
_MAX_PARTS = 3
_ERRORS = {101: "token id outside the embedding", 102: "position outside a static cache",
           103: "could not allocate scratch memory", 1: "unknown block format",
           2: "sizes that are not whole blocks", 3: "a row index out of range", 4: "out of memory"}
_P, _I64, _F32, _F64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_double


class _Linear(ctypes.Structure):
    _fields_ = [("type", _I64), ("weight", _P), ("out", _I64), ("in_", _I64), ("int8_x", _I64)]


class _Layer(ctypes.Structure):
    _fields_ = [("qkv", _Linear * _MAX_PARTS), ("n_qkv", _I64), ("o", _Linear),
                ("gate_up", _Linear * _MAX_PARTS), ("n_gate_up", _I64), ("down", _Linear),
                ("attn_norm", _P), ("mlp_norm", _P), ("post_attn_norm", _P), ("post_mlp_norm", _P),
                ("q_norm", _P), ("k_norm", _P), ("keys", _P), ("values", _P), ("positions", _P),
                ("slots", _I64), ("rolling", _I64), ("band_lo", _F64), ("band_hi", _F64),
                ("inv_freq", _P), ("scale", _F32)]


class _Model(ctypes.Structure):
    _fields_ = [("family", _I64), ("dim", _I64), ("n_heads", _I64), ("n_kv_heads", _I64), ("head_dim", _I64),
                ("ffn_dim", _I64), ("n_layers", _I64), ("eps", _F32), ("embed_scale", _F32),
                ("embed", _Linear), ("head", _Linear), ("final_norm", _P), ("layers", ctypes.POINTER(_Layer)),
                ("matmul", _P), ("dequantize", _P), ("threads", _I64), ("run_pool", _P)]


@dataclass(frozen=True)
class LinearSpec:
    """A weight ``W (out, in)``: GGUF ``blocks (out, row_bytes)`` uint8 of format ``fmt`` in the
    kernel layout, or (``fmt`` None) a contiguous float32 ``(out, in)`` tensor; ``int8``: the
    quantized kernel takes int8 activations (the layer's mode)."""

    tensor: torch.Tensor
    fmt: Optional[str] = None
    int8: bool = False

    @property
    def out_features(self) -> int:
        return self.tensor.shape[0]

    @property
    def in_features(self) -> int:
        return self.tensor.shape[1] if self.fmt is None else FORMATS[self.fmt].in_features(self.tensor.shape[1])


@dataclass(frozen=True)
class LayerSpec:
    """One decoder layer: weights (``qkv``: q, k, v rows in order, one spec when fused; ``gate_up``
    likewise), float32 norm weights ``(dim,)`` / ``(head_dim,)`` (the Gemma 3 ones None for Llama),
    the cache buffers ``keys``/``values`` ``(1, Hkv, slots, D)`` and ``positions (slots,)`` int64,
    ``rolling`` (slot = position % slots), the band ``(lo, hi)`` of the layer's pattern, float32
    ``inv_freq (D/2,)`` and the score ``scale``."""

    qkv: Sequence[LinearSpec]
    o: LinearSpec
    gate_up: Sequence[LinearSpec]
    down: LinearSpec
    attn_norm: torch.Tensor
    mlp_norm: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    rolling: bool
    band: tuple[float, float]
    inv_freq: torch.Tensor
    scale: float
    post_attn_norm: Optional[torch.Tensor] = None
    post_mlp_norm: Optional[torch.Tensor] = None
    q_norm: Optional[torch.Tensor] = None
    k_norm: Optional[torch.Tensor] = None


def _step_library() -> Optional[ctypes.CDLL]:
    library = load_native(_SOURCE).library
    if library is not None and not getattr(library, "_attnkit_typed", False):
        library.ds_step.argtypes = [ctypes.POINTER(_Model), _I64, _I64, _P]
        library.ds_step.restype = ctypes.c_int
        library._attnkit_typed = True
    return library


def native_step_available() -> bool:
    """Whether both libraries the step needs (``decode_step`` and ``gguf_matmul``) are built."""
    return _step_library() is not None and _quant_library() is not None


def _address(tensor: Optional[torch.Tensor]) -> Optional[int]:
    return None if tensor is None else tensor.data_ptr()


class StepPlan:
    """Everything ``ds_step`` reads, built once; :meth:`step` computes one token's logits.

    Args:
        family: ``"llama"`` or ``"gemma3"`` (the norms' kind, the MLP's gate, the post-norms).
        dim, n_heads, n_kv_heads, head_dim, ffn_dim: the model's sizes.
        eps: every norm's epsilon.
        embed_scale: multiplier of the embedding (Gemma 3: float32 ``sqrt(dim)``; 1.0 for Llama).
        embed, head: ``(vocab, dim)`` weights (the same tensor when tied).
        final_norm: float32 ``(dim,)``.
        layers: one :class:`LayerSpec` per layer.
    Raises:
        ValueError: for a tensor of the wrong dtype, device, shape or layout (named), or an
        unknown family.
        RuntimeError: when the native libraries are not built (check :func:`native_step_available`).
    """

    def __init__(self, family: str, *, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, ffn_dim: int,
                 eps: float, embed_scale: float, embed: LinearSpec, head: LinearSpec, final_norm: torch.Tensor,
                 layers: Sequence[LayerSpec]) -> None:
        if family not in FAMILIES:
            raise ValueError(f"StepPlan: family must be one of {', '.join(FAMILIES)}, got {family!r}")
        library, quant = _step_library(), _quant_library()
        if library is None or quant is None:
            raise RuntimeError("StepPlan: the native libraries decode_step and gguf_matmul are not built "
                               "(attnkit info says why)")
        if n_heads % n_kv_heads or head_dim % 2:
            raise ValueError(f"StepPlan: n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads}) "
                             f"and head_dim ({head_dim}) even")
        self._library, self._keep = library, []
        self.vocab_size = head.out_features
        self._check_linear("embed", embed, embed.out_features, dim)
        self._check_linear("head", head, self.vocab_size, dim)
        qkv_rows = (n_heads + 2 * n_kv_heads) * head_dim
        c_layers = (_Layer * len(layers))()
        for i, (spec, layer) in enumerate(zip(layers, c_layers)):
            where = f"layer {i}"
            self._fill_group(f"{where} qkv", layer.qkv, spec.qkv, qkv_rows, dim)
            layer.n_qkv = len(spec.qkv)
            layer.o = self._linear(f"{where} o", spec.o, dim, n_heads * head_dim)
            self._fill_group(f"{where} gate_up", layer.gate_up, spec.gate_up, 2 * ffn_dim, dim)
            layer.n_gate_up = len(spec.gate_up)
            layer.down = self._linear(f"{where} down", spec.down, dim, ffn_dim)
            for name, size in (("attn_norm", dim), ("mlp_norm", dim), ("post_attn_norm", dim), ("post_mlp_norm", dim),
                               ("q_norm", head_dim), ("k_norm", head_dim)):
                setattr(layer, name, self._floats(f"{where} {name}", getattr(spec, name), (size,)))
            slots = spec.keys.shape[2] if spec.keys.dim() == 4 else -1
            for name in ("keys", "values"):
                self._floats(f"{where} {name}", getattr(spec, name), (1, n_kv_heads, slots, head_dim))
            if spec.positions.dtype != torch.int64 or tuple(spec.positions.shape) != (slots,) \
                    or not spec.positions.is_contiguous():
                raise ValueError(f"StepPlan: {where} positions must be contiguous int64 ({slots},), got "
                                 f"{spec.positions.dtype} {tuple(spec.positions.shape)}")
            self._keep.append(spec.positions)
            layer.keys, layer.values, layer.positions = spec.keys.data_ptr(), spec.values.data_ptr(), spec.positions.data_ptr()
            layer.slots, layer.rolling = slots, int(spec.rolling)
            layer.band_lo, layer.band_hi = float(spec.band[0]), float(spec.band[1])
            layer.inv_freq = self._floats(f"{where} inv_freq", spec.inv_freq, (head_dim // 2,))
            layer.scale = spec.scale
        self._layers = c_layers
        self._model = _Model(
            family=FAMILIES[family], dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
            ffn_dim=ffn_dim, n_layers=len(layers), eps=eps, embed_scale=embed_scale,
            embed=self._linear("embed", embed, embed.out_features, dim), head=self._linear("head", head, self.vocab_size, dim),
            final_norm=self._floats("final_norm", final_norm, (dim,)), layers=c_layers,
            matmul=ctypes.cast(quant.gguf_matmul, _P).value, dequantize=ctypes.cast(quant.gguf_dequantize, _P).value,
            threads=kernel_threads(), run_pool=ctypes.cast(quant.gguf_pool_run, _P).value,
        )

    def _floats(self, where: str, tensor: Optional[torch.Tensor], shape: tuple[int, ...]) -> Optional[int]:
        """The address of a contiguous float32 CPU ``tensor`` of ``shape`` (kept alive), None for None."""
        if tensor is None:
            return None
        if tensor.dtype != torch.float32 or tensor.device.type != "cpu" or not tensor.is_contiguous() \
                or tuple(tensor.shape) != shape:
            raise ValueError(f"StepPlan: {where} must be a contiguous float32 CPU tensor {shape}, got "
                             f"{tensor.dtype} {tuple(tensor.shape)} on {tensor.device}")
        self._keep.append(tensor)
        return _address(tensor)

    def _check_linear(self, where: str, spec: LinearSpec, out: int, in_features: int) -> None:
        tensor = spec.tensor
        if spec.fmt is None:
            self._floats(where, tensor, (out, in_features))
            return
        if spec.fmt not in FORMATS:
            raise ValueError(f"StepPlan: {where} has format {spec.fmt!r}; the kernels read {', '.join(FORMATS)}")
        if tensor.dtype != torch.uint8 or tensor.device.type != "cpu" or not tensor.is_contiguous() \
                or tensor.dim() != 2 or spec.out_features != out or spec.in_features != in_features \
                or tensor.shape[1] % FORMATS[spec.fmt].block_bytes:
            raise ValueError(f"StepPlan: {where} must be contiguous uint8 {spec.fmt} blocks of {out} rows of "
                             f"{in_features} weights, got {tensor.dtype} {tuple(tensor.shape)}")
        self._keep.append(tensor)

    def _linear(self, where: str, spec: LinearSpec, out: int, in_features: int) -> _Linear:
        self._check_linear(where, spec, out, in_features)
        kind = FLOAT_WEIGHT if spec.fmt is None else FORMATS[spec.fmt].ggml_type
        return _Linear(kind, spec.tensor.data_ptr(), out, in_features, int(spec.int8))

    def _fill_group(self, where: str, target, specs: Sequence[LinearSpec], rows: int, in_features: int) -> None:
        if not 1 <= len(specs) <= _MAX_PARTS or sum(s.out_features for s in specs) != rows:
            raise ValueError(f"StepPlan: {where} must be 1 to {_MAX_PARTS} weights of {rows} rows in all, got "
                             f"{[s.out_features for s in specs]}")
        for i, spec in enumerate(specs):
            target[i] = self._linear(f"{where}[{i}]", spec, spec.out_features, in_features)

    def step(self, token: int, position: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """float32 logits ``(vocab,)`` of ``token`` at ``position``; its keys and values are written
        into the caches (the position's slot, and the slot's entry of ``positions``). ``out``: a
        contiguous float32 ``(vocab,)`` tensor to write into. Raises ValueError for a token outside
        the vocabulary or a position outside a static cache, RuntimeError when a kernel fails."""
        if out is None:
            out = torch.empty(self.vocab_size)
        elif out.dtype != torch.float32 or not out.is_contiguous() or out.shape != (self.vocab_size,):
            raise ValueError(f"StepPlan.step: out must be a contiguous float32 ({self.vocab_size},) tensor, got "
                             f"{out.dtype} {tuple(out.shape)}")
        self._model.threads = kernel_threads()
        status = self._library.ds_step(ctypes.byref(self._model), token, position, out.data_ptr())
        if status == 101:
            raise ValueError(f"StepPlan.step: token {token} lies outside [0, {self._model.embed.out})")
        if status == 102:
            raise ValueError(f"StepPlan.step: position {position} lies outside a static cache (or is negative)")
        if status:
            raise RuntimeError(f"StepPlan.step: native step failed: {_ERRORS.get(status, f'status {status}')}")
        return out


add_status_note(_SOURCE, lambda: "the default decoding step of quantized GGUF Llama and Gemma 3 models on CPU "
                                 "(off: ATTNKIT_NATIVE=0 or --no-native-step)")

__all__ = ["FAMILIES", "LayerSpec", "LinearSpec", "StepPlan", "native_step_available"]
