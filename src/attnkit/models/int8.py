"""Weight-only int8 quantization of a Llama's linear layers (CPU and CUDA).

Each weight ``W (out, in)`` becomes int8 values ``Q`` and one scale per output channel,
``s[o] = max_i |W[o, i]| / 127``, ``Q = round(W / s)``; ``y = (x @ Q.T) * s``. Activations stay in
the model's dtype. Decoding one token reads every weight once, so int8 halves the bytes read
against bfloat16 (a quarter against float32) and decode speed follows on a memory-bound machine.

Which product runs:

- a few rows (up to ``DENSE_ROWS``, decoding) on the CPU: the native kernel
  :func:`~attnkit.kernels.int8_native.int8_matmul`, which streams each int8 weight once per call
  and accumulates in float32 (the layer stores the weight in the kernel's packed layout, made once
  at construction, so the kernel reads it as one sequential stream); where it is not built (no C compiler), or on another device,
  ``torch.ops.aten._weight_int8pack_mm`` where torch has it for the device and dtype;
- many rows (a prefill, compute-bound) on the CPU: blocks of int8 rows are converted into one
  reused buffer (``BLOCK_BYTES``) of the activations' dtype (values up to 127 are exact in bfloat16) and
  multiplied there by torch's matrix product, so no full-size dequantized weight is ever made;
- anything else: dequantize, then ``linear``.

The state dict holds the logical ``weight_int8 (out, in)`` and ``scales``, whatever the stored
layout. The vocabulary head is quantized too (for a tied model, a quantized copy of the embedding; the
embedding lookup itself stays in the model's dtype).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.int8_native import PACK_CHANNELS, int8_matmul, int8_native_supports, pack_int8, unpack_int8, widen_into
from .cpu_pack import DENSE_ROWS, replace_linears

BLOCK_BYTES = 1 << 25
"""Size of the buffer a prefill converts int8 weight rows into (per thread and dtype): 32 MiB, so
that most layers of a 1B model take one or two products (each is a parallel region, and on a
busy machine every region costs a wait for the threads; 4 MiB blocks measured 2.3x slower with
two threads), yet small against the model."""
_scratch = threading.local()


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(int8 (out, in), float32 scales (out,))`` with ``weight ≈ q * scales[:, None]``; an
    all-zero row gets scale 1 (its values are 0 either way)."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1) / 127
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    """``y = x @ W.T`` with ``W`` stored as int8 rows and per-output-channel scales;
    ``x (..., in)`` in float32, bfloat16 or float16, ``y (..., out)`` in ``x``'s dtype. The int8
    values are kept only in the native kernel's packed layout (``weight_packed``); ``weight_int8``
    unpacks them, and state dicts hold ``weight_int8`` (so that they do not depend on the layout).

    Args:
        weight: the ``(out, in)`` weight to quantize (any float dtype and device).
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        if weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"Int8Linear: weight must be a 2-D float tensor, got {weight.dtype} {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        q, scales = quantize_rows(weight)
        self.register_buffer("weight_packed", pack_int8(q))
        self.register_buffer("scales", scales)
        self._fused: dict[tuple, bool] = {}
        self._rows: tuple = ((), None)

    @property
    def weight_int8(self) -> torch.Tensor:
        """The int8 weight ``(out, in)``, unpacked (a new tensor)."""
        return unpack_int8(self.weight_packed, self.out_features, self.in_features)

    def _unpacked(self) -> torch.Tensor:
        """:attr:`weight_int8`, kept for the paths without the native kernel (torch's int8 kernel,
        other devices), so that they do not unpack every call; made again after the packed buffer
        changes (loading, moving to another device)."""
        packed = self.weight_packed
        key = (packed.data_ptr(), packed._version, packed.device)
        if self._rows[0] != key:
            self._rows = (key, self.weight_int8)
        return self._rows[1]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight_int8"] = self.weight_int8
        destination[prefix + "scales"] = self.scales if keep_vars else self.scales.detach()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # State dicts hold the (out, in) rows; a wrong shape is left to the packed buffer's check.
        key = prefix + "weight_int8"
        if key in state_dict:
            q = state_dict.pop(key)
            if tuple(q.shape) == (self.out_features, self.in_features):
                q = pack_int8(q)
            state_dict[prefix + "weight_packed"] = q
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the layer multiplies by, ``(out, in)`` in ``dtype``."""
        return (self.weight_int8.float() * self.scales[:, None]).to(dtype)

    def _fused_ok(self, x: torch.Tensor) -> bool:
        # The fused kernel exists for some devices and dtypes only; try it once per kind of input,
        # with more than one row. torch 2.13's CPU kernel crashes the process (no exception) for
        # bfloat16 with several rows when in_features is not a multiple of 16, so such widths
        # never reach it, in any dtype.
        if self.in_features % 16:
            return False
        key = (x.device.type, x.dtype)
        if key not in self._fused:
            try:
                torch.ops.aten._weight_int8pack_mm(x[:2].contiguous(), self._unpacked(), self.scales.to(x.dtype))
                self._fused[key] = True
            except (RuntimeError, NotImplementedError):
                self._fused[key] = False
        return self._fused[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Int8Linear: x has {x.shape[-1]} features, the layer takes {self.in_features}")
        rows = x.reshape(-1, self.in_features)
        few = rows.shape[0] <= DENSE_ROWS
        if few and int8_native_supports(rows, self.weight_packed):
            out = int8_matmul(rows, self.weight_packed, self.scales)
        elif few and self._fused_ok(rows):
            out = torch.ops.aten._weight_int8pack_mm(rows.contiguous(), self._unpacked(), self.scales.to(x.dtype))
        elif x.device.type == "cpu":
            out = self._blocked_product(rows)
        else:
            out = F.linear(rows, self._unpacked().to(x.dtype)) * self.scales.to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _blocked_product(self, rows: torch.Tensor) -> torch.Tensor:
        """``(rows @ Q.T) * s`` for many rows ``(m, in)``: blocks of weight rows converted into a
        reused buffer of ``rows``' dtype and multiplied there (the transposed output ``(out, m)`` is
        written block by block, as contiguous rows), then scaled in float32 and rounded once more.
        Blocks are whole blocks of the packed layout, unpacked one at a time."""
        block = max(1, BLOCK_BYTES // (self.in_features * rows.element_size()) // PACK_CHANNELS) * PACK_CHANNELS
        buffer = _buffer(block * self.in_features, rows.dtype)
        out_t = torch.empty(self.out_features, rows.shape[0], dtype=rows.dtype)
        rows_t = rows.T
        for start in range(0, self.out_features, block):
            stop = min(start + block, self.out_features)
            weight = buffer[: (stop - start) * self.in_features].view(stop - start, self.in_features)
            packed = self.weight_packed[start // PACK_CHANNELS: -(-stop // PACK_CHANNELS)]
            widen_into(unpack_int8(packed, stop - start, self.in_features), weight)
            torch.mm(weight, rows_t, out=out_t[start:stop])
        scaled = torch.empty(rows.shape[0], self.out_features)
        return torch.mul(out_t.T, self.scales, out=scaled).to(rows.dtype)


def _buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """This thread's conversion buffer for ``dtype``, at least ``numel`` elements."""
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    if dtype not in buffers or buffers[dtype].numel() < numel:
        buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buffers[dtype]


def is_int8(model: nn.Module) -> bool:
    """Whether :func:`quantize_int8` has quantized ``model``."""
    return any(isinstance(m, Int8Linear) for m in model.modules())


@torch.no_grad()
def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace, in place, each bias-free ``nn.Linear`` of a Llama ``model`` by an
    :class:`Int8Linear`; a tied model gets an int8 copy of its embedding as ``lm_head``. Returns
    ``model`` (inference only; save it before quantizing)."""
    return replace_linears(model, Int8Linear)
