"""``attnkit explain`` at long context: the held rows are exact and nothing of size N x N is made.

The rows a long prompt holds come from the backends' log-sum-exp (:mod:`attnkit.analysis.explain`);
here they are checked against :func:`attnkit.reference_attention` run on each held row alone
(one query over its causal prefix, so the oracle needs no N x N either), every tensor the
explanation creates is watched for its size, and at 16k tokens the peak memory of a whole
explanation is compared with that of a plain forward pass of the same prompt, each in a fresh
process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from attnkit.analysis import explain_text
from attnkit.models.registry import identify
from explain_checkpoints import WORDS, reference_rows, save_tiny_llama

pytest.importorskip("tokenizers")

ROWS = [5, 700, 1500]


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation returns while active: ``numel``, ``shape``, ``op``."""

    def __init__(self):
        super().__init__()
        self.numel, self.shape, self.op = 0, (), None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.numel() > self.numel:
                self.numel, self.shape, self.op = tensor.numel(), tuple(tensor.shape), func
        return out


def long_text(words: int, seed: int = 0) -> str:
    """``words`` words of the tiny Llama's vocabulary (one token each, plus BOS)."""
    vocabulary = WORDS + [f"w{i}" for i in range(200)]
    picks = torch.randint(len(vocabulary), (words,), generator=torch.Generator().manual_seed(seed))
    return " ".join(vocabulary[int(i)] for i in picks)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-long"))


def _check_long_prompt(tiny_llama, words: int, rows: list[int]) -> dict:
    watch = LargestTensor()
    with watch:
        data = explain_text(long_text(words), model=tiny_llama, positions=rows)
    n = len(data["tokens"]["ids"])
    assert n == words + 1 and not data["every_row"] and data["rows"] == sorted(rows)
    # Nothing near N x N: the largest tensor is the logits (N x vocabulary) or a held row block.
    assert watch.numel < n * n // 4, f"{watch.op} made a {watch.shape} tensor for {n} tokens"
    model = identify(tiny_llama).load(dtype=torch.float32)
    reference = reference_rows(model, data["tokens"]["ids"], data["rows"])
    for layer, expected in enumerate(reference):
        torch.testing.assert_close(data["step1"]["weights"][layer], expected, atol=1e-10, rtol=0)
    return data


def test_a_long_prompt_holds_exact_rows_without_an_n_by_n_tensor(tiny_llama):
    _check_long_prompt(tiny_llama, 2047, ROWS)


@pytest.mark.slow  # about a minute: two forward passes and the oracle over 16k tokens
def test_a_16k_prompt_holds_exact_rows_without_an_n_by_n_tensor(tiny_llama):
    _check_long_prompt(tiny_llama, 16383, [0, 100, 8000, 16383])


_PEAK = """
import json, resource, sys, torch
from attnkit.analysis import explain_text
from attnkit.models.registry import identify
from attnkit.models.tokenizer import Tokenizer
mode, path, text = sys.argv[1], sys.argv[2], open(sys.argv[3]).read()
if mode == "plain":
    checkpoint = identify(path)
    ids = Tokenizer(checkpoint.source)(text).ids
    model = checkpoint.load(dtype=torch.float32)
    with torch.no_grad():
        model(torch.tensor([ids]))
else:
    explain_text(text, model=path, positions=[100, 8000])
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
"""


@pytest.mark.slow  # two fresh processes over 16k tokens
def test_a_16k_explanation_peaks_near_a_plain_forward_pass(tiny_llama, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(long_text(16383))
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}

    def peak(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", _PEAK, mode, str(tiny_llama), str(text)], env=env,
                              capture_output=True, text=True, timeout=600, check=True)
        return json.loads(done.stdout.splitlines()[-1])

    plain, explained = peak("plain"), peak("explain")
    # An N x N float32 matrix at 16k tokens is 1 GiB; the held rows cost rows x N per head.
    assert explained - plain < 256 * 2**20, (plain, explained)
