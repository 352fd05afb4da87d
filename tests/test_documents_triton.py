"""Packed documents on the Triton backend (Triton's interpreter without a GPU): out, LSE and
gradients against float64 attention on small sizes; documents run as block lists, so blocks with
no pair inside a document are never visited."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("no CUDA device and TRITON_INTERPRET is off: the Triton kernels cannot run here",
                allow_module_level=True)
pytest.importorskip("triton")

from attnkit import Causal, Document, SlidingWindow, attention  # noqa: E402
from attnkit.kernels.triton_launch import kernel_parts  # noqa: E402
from attnkit.kernels.triton_lists import _document_candidates, block_list  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("out", "lse", "dq", "dk", "dv")


def _results(pattern, q, k, v, backend, dtype):
    leaves = [t.detach().to(DEVICE, dtype).requires_grad_() for t in (q, k, v)]
    out, lse = attention(*leaves, pattern, backend=backend, return_lse=True)
    gen = torch.Generator().manual_seed(1)
    w_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    w_lse = torch.randn(lse.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    loss = (out.double() * w_out).sum() + (torch.where(torch.isinf(lse), 0.0, lse.double()) * w_lse).sum()
    return [t.detach().cpu().double() for t in (out, lse, *torch.autograd.grad(loss, leaves))]


@pytest.mark.parametrize("pattern, n_q, heads", [
    (Document([5, 0, 1, 30, 9]), 45, (2, 2)),
    (Causal() & Document([17, 1, 0, 27]), 45, (4, 2)),
    (SlidingWindow(6) & Document([3, 20, 1, 21]), 45, (2, 1)),
    (Causal() & Document([30, 2, 13]), 16, (2, 2)),  # Nq < Nk: the last 16 positions
])
def test_triton_runs_documents_exactly(pattern, n_q, heads):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads[0], n_q, 16, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, heads[1], 45, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    expected = _results(pattern, q, k, v, "reference", torch.float64)
    actual = _results(pattern, q, k, v, "triton", torch.float32)
    for name, a, e in zip(NAMES, actual, expected):
        assert torch.equal(torch.isinf(a), torch.isinf(e)), name
        torch.testing.assert_close(torch.where(torch.isinf(a), 0.0, a), torch.where(torch.isinf(e), 0.0, e),
                                   rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_documents_run_as_block_lists_that_skip_blocks_across_documents():
    pattern = Causal() & Document([64, 64, 64, 64])
    (part,) = kernel_parts(pattern)
    assert type(part).__name__ == "BlocksPart"  # not a band kernel: those have no document cut
    lists = block_list(pattern, 256, 256, 32, torch.device("cpu")).by_query
    assert lists.full_count.tolist() == [0, 1] * 4  # per document of 2 x 2 blocks: the causal 3,
    assert lists.partial_count.tolist() == [1, 1] * 4  # none across documents
    assert _document_candidates(Document([64] * 4), 256, 256, 32, torch.device("cpu")).sum() == 4 * 4
