"""Rotary position embedding (Su et al., 2021) in the half-split layout, with Llama 3.1 or linear scaling.

Half-split ("Hugging Face") layout: the ``D`` features of a head form ``D/2`` pairs
``(x[f], x[f + D/2])``; pair ``f`` is rotated by the angle ``position * inv_freq[f]`` with
``inv_freq[f] = theta ** (-2f / D)``. Meta's original checkpoints pair adjacent features instead
(``x[2f], x[2f+1]``); :mod:`attnkit.models.llama.meta_checkpoint` permutes their weights into this layout.

Llama 3.1 frequency scaling stretches long wavelengths so a model trained on
``original_max_position_embeddings`` tokens reaches ``factor`` times further: with
``wavelen = 2 pi / inv_freq``, wavelengths shorter than ``original / high_freq_factor`` keep their
frequency, those longer than ``original / low_freq_factor`` are divided by ``factor``, and those in
between blend the two linearly in ``original / wavelen``. Every value comes from the config (Llama
3.2 uses ``factor = 32``). Linear scaling (Gemma 3's global layers from 4B up) divides every
frequency by ``factor``.

Angles and rotations are computed in float32 for float32 and narrower inputs, and in float64 for
float64 inputs (so a float64 model is float64 throughout).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn


@dataclass(frozen=True)
class Llama3RopeScaling:
    """The ``rope_scaling`` (``rope_type = "llama3"``) block of a Llama 3.1 / 3.2 config."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if not self.factor >= 1:
            raise ValueError(f"rope scaling factor must be >= 1, got {self.factor!r}")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(
                "rope scaling needs 0 < low_freq_factor < high_freq_factor, got "
                f"{self.low_freq_factor!r} and {self.high_freq_factor!r}"
            )
        original = self.original_max_position_embeddings
        if isinstance(original, bool) or not isinstance(original, int) or original <= 0:
            raise ValueError(f"original_max_position_embeddings must be a positive integer, got {original!r}")


@dataclass(frozen=True)
class LinearRopeScaling:
    """``rope_type = "linear"``: every frequency divided by ``factor`` (positions stretched by it)."""

    factor: float

    def __post_init__(self) -> None:
        if isinstance(self.factor, bool) or not isinstance(self.factor, (int, float)) or not 1 <= self.factor < math.inf:
            raise ValueError(f"linear rope scaling factor must be a finite number >= 1, got {self.factor!r}")


RopeScaling = Union[Llama3RopeScaling, LinearRopeScaling]


def rope_frequencies(head_dim: int, theta: float, scaling: Optional[RopeScaling] = None) -> torch.Tensor:
    """``inv_freq (head_dim / 2,)`` in float64: the angle per position of each feature pair."""
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"rope: head_dim must be a positive even integer, got {head_dim!r}")
    if not theta > 0:
        raise ValueError(f"rope: theta must be positive, got {theta!r}")
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling is None:
        return inv_freq
    if isinstance(scaling, LinearRopeScaling):
        return inv_freq / scaling.factor
    original = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    # 0 at wavelen = original / low_freq_factor (fully scaled), 1 at original / high_freq_factor (kept).
    blend = (original / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blend = blend.clamp(0.0, 1.0)
    return blend * inv_freq + (1 - blend) * inv_freq / scaling.factor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype rotary angles and rotations use for inputs of ``dtype``: float32, or float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x (B, H, N, D)`` by ``cos``/``sin`` ``(N, D/2)`` or ``(B, 1, N, D/2)`` (in
    :func:`compute_dtype` of x); computed in that dtype and returned in x's dtype."""
    half = x.shape[-1] // 2
    x1, x2 = x.to(cos.dtype).split(half, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """The ``rope(q, k, positions)`` hook of :class:`attnkit.nn.MultiHeadAttention`.

    Args:
        head_dim: ``D`` (even).
        theta: base of the frequencies (Llama 3: 500000).
        scaling: Llama 3.1 or linear frequency scaling, or None.
    Call: ``q (B, Hq, N, D)``, ``k (B, Hkv, N, D)``, integer ``positions`` ``(N,)`` or ``(B, N)``
    -> rotated ``(q, k)`` in their dtypes. Angles are computed from float64 frequencies in float32
    (float64 for float64 inputs).

    A model shares one module between its layers, and each layer calls it with the same
    ``positions`` tensor: the module keeps the last ``(cos, sin)`` it computed and reuses them while
    the call passes that same tensor object, unmodified (its in-place version counter unchanged),
    in the same dtype, so a forward pass computes its angles once, not once per layer.
    """

    def __init__(self, head_dim: int, theta: float = 500000.0, scaling: Optional[RopeScaling] = None) -> None:
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, float(theta), scaling
        self.register_buffer("inv_freq", torch.empty(head_dim // 2, dtype=torch.float64), persistent=False)
        self._last: Optional[tuple] = None  # (positions, its version, dtype, cos, sin)
        self.reset_frequencies()

    def reset_frequencies(self, device: torch.device | str | None = None) -> None:
        """(Re)compute ``inv_freq`` (float64) on ``device`` (default: where it is; a model built on
        the meta device calls this after its weights are loaded)."""
        device = self.inv_freq.device if device is None else device
        self._last = None
        if torch.device(device).type == "meta":
            self.inv_freq = torch.empty(self.head_dim // 2, dtype=torch.float64, device="meta")
            return
        self.inv_freq = rope_frequencies(self.head_dim, self.theta, self.scaling).to(device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` in ``dtype`` (float32 or float64) of shape ``(N, D/2)`` for ``(N,)``
        positions or ``(B, 1, N, D/2)`` for ``(B, N)`` positions."""
        if positions.dim() not in (1, 2) or positions.is_floating_point():
            raise ValueError(
                f"rope: positions must be integer (N,) or (batch, N), got {positions.dtype} {tuple(positions.shape)}"
            )
        angles = positions.to(self.inv_freq.device, dtype).unsqueeze(-1) * self.inv_freq.to(dtype)
        if angles.dim() == 3:
            angles = angles.unsqueeze(1)  # broadcast over heads
        return angles.cos(), angles.sin()

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self._shared_cos_sin(positions, compute_dtype(q.dtype))
        return rotate(q, cos, sin), rotate(k, cos, sin)

    def _shared_cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`cos_sin`, reused from the previous call for the same, unmodified ``positions``
        (traced anew under ``torch.compile``, which sees the layers' calls in one graph anyway)."""
        if torch.compiler.is_compiling():
            return self.cos_sin(positions, dtype)
        last = self._last
        if last is not None and last[0] is positions and last[1] == positions._version and last[2] == dtype:
            return last[3], last[4]
        cos, sin = self.cos_sin(positions, dtype)
        self._last = (positions, positions._version, dtype, cos, sin)
        return cos, sin
