"""The visibility rule without a host read (the CUDA path of ``kernels.common.visible``), run here on
CPU tensors by pretending the device is one where a host read is a sync."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attnkit import Causal, Fixed, Full, PerHead, Predicate, SlidingWindow, Strided, attention, reference_attention
from attnkit.kernels import common
from attnkit.kernels.common import nonfinite_keys, rows_seeing, rows_seeing_on_device, visible_on_device

BACKENDS = ["reference", "dense", "blockwise", "sparse", "auto"]
PATTERNS = [
    (Causal(), 20), (SlidingWindow(4), 20), (SlidingWindow(5, causal=False), 30), (Strided(8), 16),
    (Fixed(8, 2), 15), (Predicate(lambda i, j: (j <= i) & (j % 3 == 0)), 21),
    (PerHead([Causal(), SlidingWindow(3), Strided(4), SlidingWindow(9, causal=False)]), 20),
]


@pytest.fixture
def sync_free(monkeypatch):
    """Every device counts as one where a host read is a sync: ``visible`` takes the device path."""
    monkeypatch.setattr(common, "sync_free", lambda device: True)


def _poisoned(kind: str, position: int, value: float):
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 4, 48, 16, generator=gen) for _ in range(3))
    k, v = k[:, :2].clone(), v[:, :2].clone()
    bad_k, bad_v = k.clone(), v.clone()
    (bad_k if kind == "k" else bad_v)[1, 1, position, 3] = value
    return q, (k, v), (bad_k, bad_v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern, position", PATTERNS)
@pytest.mark.parametrize("kind, value", [("k", float("nan")), ("k", float("-inf")), ("v", float("inf"))])
def test_rows_that_cannot_see_a_non_finite_entry_are_exact_and_the_others_nan(
        sync_free, backend, pattern, position, kind, value):
    q, clean, bad = _poisoned(kind, position, value)
    out, lse = attention(q, *bad, pattern, backend=backend, return_lse=True)
    expected_out, expected_lse = attention(q, *clean, pattern, backend=backend, return_lse=True)
    sees = pattern.mask(48, 48)[..., position]  # ([Hq,] Nq): rows that may see the position
    blind = torch.ones(2, 4, 48, dtype=torch.bool)
    blind[1, 2:] = ~sees[2:] if sees.dim() == 2 else ~sees  # query heads 2-3 of batch 1 use KV head 1
    torch.testing.assert_close(out[blind], expected_out[blind])
    assert torch.isnan(out[~blind]).all()
    torch.testing.assert_close(lse[blind], expected_lse[blind])
    if kind == "k":
        assert torch.isnan(lse[~blind]).all()
    else:  # the LSE does not depend on the values
        torch.testing.assert_close(lse[~blind], expected_lse[~blind])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_of_rows_that_cannot_see_a_non_finite_entry_are_exact(sync_free, backend):
    q, (k, v), (bad_k, bad_v) = _poisoned("v", 20, float("nan"))
    bad_k[0, 0, 30, 0] = float("inf")
    leaves = [t.clone().requires_grad_() for t in (q, bad_k, bad_v)]
    out = attention(*leaves, Causal(), backend=backend)
    out.sum().backward()  # rows that see a NaN pass no gradient back
    for leaf in leaves:
        assert torch.isfinite(leaf.grad).all()
    clean_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    clean_out = attention(*clean_leaves, Causal(), backend=backend)
    blind = torch.isfinite(out)
    assert blind[:, :, :20].all() and not blind.all()
    clean_out[blind].sum().backward()
    for leaf, clean in zip(leaves, clean_leaves):
        torch.testing.assert_close(leaf.grad, clean.grad)


def test_reference_weights_follow_the_rule_on_the_device_path(sync_free):
    q, (k, v), (bad_k, bad_v) = _poisoned("k", 20, float("nan"))
    out, weights = reference_attention(q, bad_k, bad_v, SlidingWindow(4))
    _, clean_weights = reference_attention(q, k, v, SlidingWindow(4))
    sees = SlidingWindow(4).mask(48, 48)[:, 20]
    torch.testing.assert_close(weights[1, 2:, ~sees], clean_weights[1, 2:, ~sees])
    assert torch.isnan(weights[1, 2:, sees]).all() and torch.isnan(out[1, 2:, sees]).all()


def test_a_nan_in_a_padding_key_reaches_no_row_on_the_device_path(sync_free):
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    padding = torch.tensor([[False, True, True, True, True, True]])
    clean = attention(q, k, v, Causal(), key_padding_mask=padding)
    k[0, :, 0] = float("nan")
    v[0, :, 0] = float("inf")
    torch.testing.assert_close(attention(q, k, v, Causal(), key_padding_mask=padding), clean)


def test_explicit_positions_on_the_device_path(sync_free):
    q, (k, v), (bad_k, bad_v) = _poisoned("v", 20, float("nan"))
    q_pos, k_pos = torch.arange(100, 148), torch.arange(100, 148)
    out = attention(q, bad_k, bad_v, SlidingWindow(4), backend="reference", q_positions=q_pos, k_positions=k_pos)
    clean = attention(q, k, v, SlidingWindow(4), backend="reference", q_positions=q_pos, k_positions=k_pos)
    sees = SlidingWindow(4).mask(48, 48)[:, 20]
    torch.testing.assert_close(out[1, 2:, ~sees], clean[1, 2:, ~sees])
    assert torch.isnan(out[1, 2:, sees]).all() and torch.isfinite(out[0]).all()


def test_a_pattern_that_hides_nothing_is_not_checked(sync_free):
    q, _, (k, v) = _poisoned("v", 20, float("nan"))
    out = attention(q, k, v, Full(), backend="dense")
    assert torch.isnan(out[1, 2:]).any(-1).all() and torch.isfinite(out[0]).all()


@pytest.mark.parametrize("n_q, n_k", [(48, 48), (7, 48), (1, 48), (48, 20)])
@pytest.mark.parametrize("pattern", [
    Causal(), SlidingWindow(1), SlidingWindow(6), SlidingWindow(5, causal=False), SlidingWindow(100),
    SlidingWindow(4) | SlidingWindow(9, causal=False), Strided(5), Fixed(6, 2),
    PerHead([Causal(), SlidingWindow(3), Strided(4), Full()]),
])
def test_rows_seeing_on_the_device_equals_the_host_version(pattern, n_q, n_k):
    gen = torch.Generator().manual_seed(n_q + n_k)
    bad = torch.rand(3, 2, n_k, generator=gen) < 0.05
    bad[0, 1, n_k // 2] = True
    expected = rows_seeing(pattern, bad, 4, n_q)
    assert torch.equal(rows_seeing_on_device(pattern, bad, 4, n_q), expected)
    positions = (torch.arange(n_q) * 2 + 7, torch.arange(n_k) * 2)
    assert torch.equal(rows_seeing_on_device(pattern, bad, 4, n_q, positions),
                       rows_seeing(pattern, bad, 4, n_q, positions))


class _HostReads(TorchDispatchMode):
    """Records the operators that read a tensor's value on the host (a sync on CUDA)."""

    SYNCING = {"_local_scalar_dense", "nonzero", "is_nonzero", "masked_select", "unique", "_unique2",
               "equal", "allclose", "repeat_interleave.Tensor", "index.Tensor_bool"}

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__  # e.g. "nonzero.default"
        if not self.paused and (name.split(".")[0] in self.SYNCING or name in self.SYNCING
                                or _bool_index(func, args)):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def _bool_index(func, args) -> bool:
    """An index by a bool tensor (its shape depends on the values: a sync)."""
    if func.__name__.split(".")[0] not in ("index", "index_put", "index_put_"):
        return False
    indices = args[1] if len(args) > 1 else []
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices if i is not None)


@pytest.mark.parametrize("pattern", [SlidingWindow(4), Strided(8), PerHead([Causal(), Strided(3)] * 2)])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_the_device_path_reads_nothing_on_the_host(pattern, requires_grad):
    q, _, (k, v) = _poisoned("v", 20, float("nan"))
    k[0, 0, 3, 1] = float("inf")
    q, k, v = (t.requires_grad_(requires_grad) for t in (q, k, v))
    padding = torch.ones(2, 48, dtype=torch.bool)
    padding[0, :2] = False
    recorder = _HostReads()

    def run(k_, v_):  # the kernel is not under test: its own reads are not recorded
        recorder.paused = True
        try:
            return attention(q, k_, v_, pattern, backend="reference", return_lse=True)
        finally:
            recorder.paused = False

    with recorder:
        out, lse = visible_on_device(run, q, k, v, pattern, key_padding_mask=padding)
    assert recorder.seen == []
    assert torch.isnan(out).any() and torch.isfinite(out[0, :, :3]).all()
    with recorder:  # the recorder does see a host read: the host path makes one
        common.keep_visible(run(k, v), run, q, k, v, pattern)
    assert recorder.seen


def test_nonfinite_keys_and_the_device_path_agree_on_which_keys_are_bad():
    k, v = torch.randn(2, 2, 10, 4), torch.randn(2, 2, 10, 3)
    k[0, 1, 4, 2], v[1, 0, 7, 0] = float("nan"), float("-inf")
    expected = torch.zeros(2, 2, 10, dtype=torch.bool)
    expected[0, 1, 4] = expected[1, 0, 7] = True
    assert torch.equal(nonfinite_keys(k, v), expected)
