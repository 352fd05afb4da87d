"""Bad input to attention() and reference_attention() raises errors that name what was wrong."""

from __future__ import annotations

import re

import pytest
import torch

from attnkit import BACKENDS, Causal, PerHead, attention, reference_attention


def t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


CASES = [
    ("rank", (t(2, 8, 64), t(2, 8, 64), t(2, 8, 64)), {}, ValueError, r"q must have rank 4.*\(2, 8, 64\)"),
    ("k rank", (t(1, 2, 8, 4), t(2, 8, 4), t(1, 2, 8, 4)), {}, ValueError, r"k must have rank 4"),
    ("batch", (t(1, 2, 8, 4), t(2, 2, 8, 4), t(2, 2, 8, 4)), {}, ValueError, r"batch sizes differ: q \(1, 2, 8, 4\)"),
    ("head_dim", (t(1, 2, 8, 4), t(1, 2, 8, 5), t(1, 2, 8, 4)), {}, ValueError, r"q and k head_dim differ"),
    ("kv seq", (t(1, 2, 8, 4), t(1, 2, 8, 4), t(1, 2, 9, 4)), {}, ValueError, r"k and v must agree"),
    ("groups", (t(1, 3, 8, 4), t(1, 2, 8, 4), t(1, 2, 8, 4)), {}, ValueError, r"query heads \(3\) must be a multiple of key/value heads \(2\)"),
    ("dtype mix", (t(1, 2, 8, 4), t(1, 2, 8, 4, dtype=torch.float64), t(1, 2, 8, 4)), {}, TypeError, r"share one dtype"),
    ("int dtype", (torch.ones(1, 2, 8, 4, dtype=torch.int64),) * 3, {}, TypeError, r"q must be float16"),
    ("not tensor", ([1.0], t(1, 2, 8, 4), t(1, 2, 8, 4)), {}, TypeError, r"q must be a torch.Tensor, got list"),
    ("empty seq", (t(1, 2, 0, 4), t(1, 2, 8, 4), t(1, 2, 8, 4)), {}, ValueError, r"q must have heads, seq and head_dim >= 1"),
    ("backend", (t(1, 2, 8, 4),) * 3, {"backend": "flash"}, ValueError,
     re.escape(f"backend must be one of {', '.join(BACKENDS)}; got 'flash'")),
    ("pattern type", (t(1, 2, 8, 4),) * 3, {"pattern": "causal"}, TypeError, r"pattern must be an attnkit Pattern or None, got str"),
    ("per-head count", (t(1, 2, 8, 4),) * 3, {"pattern": PerHead([Causal()] * 3)}, ValueError, r"per-head for 3 heads, but q has 2 heads"),
    ("scale", (t(1, 2, 8, 4),) * 3, {"scale": "big"}, TypeError, r"scale must be a real number or None, got str"),
    ("scale nan", (t(1, 2, 8, 4),) * 3, {"scale": float("nan")}, ValueError, r"scale must be finite, got nan"),
    ("no kv heads", (t(1, 2, 8, 4), t(1, 0, 8, 4), t(1, 0, 8, 4)), {}, ValueError, r"k must have heads, seq and head_dim >= 1"),
]


@pytest.mark.parametrize("name, args, kwargs, error, message", CASES, ids=[c[0] for c in CASES])
def test_attention_rejects_bad_input(name, args, kwargs, error, message):
    with pytest.raises(error, match=message):
        attention(*args, **kwargs)


@pytest.mark.parametrize("name, args, kwargs, error, message",
                         [c for c in CASES if "backend" not in c[2]], ids=[c[0] for c in CASES if "backend" not in c[2]])
def test_reference_attention_rejects_the_same_input(name, args, kwargs, error, message):
    with pytest.raises(error, match=message):
        reference_attention(*args, **kwargs)


def test_device_mismatch_is_reported():
    q = torch.randn(1, 2, 8, 4, device="meta")
    k = v = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="one device"):
        attention(q, k, v)
