"""The decoding step: checks at the edges only, traceable as one graph with fixed shapes (what
``torch.compile`` and CUDA graphs need, checked here on the CPU), and a compiled step that falls
back cleanly or gives the same tokens."""

from __future__ import annotations

import pytest
import torch

from attnkit.models import decode_step
from attnkit.models.decode_step import run_step
from attnkit.models.llama import Llama, LlamaConfig


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Llama(LlamaConfig.preset("tiny")).eval()


def test_the_checked_forward_runs_once_per_generation(model, monkeypatch):
    """The prompt goes through ``forward`` (its token range check reads two values back to the
    host); each decoding step calls ``forward_unchecked`` directly."""
    calls = {"forward": 0, "unchecked": 0}
    forward, unchecked = Llama.forward, Llama.forward_unchecked

    def counted(name, method):
        def call(self, *args, **kwargs):
            calls[name] += 1
            return method(self, *args, **kwargs)
        return call

    monkeypatch.setattr(Llama, "forward", counted("forward", forward))
    monkeypatch.setattr(Llama, "forward_unchecked", counted("unchecked", unchecked))
    model.generate([[1, 2, 3]], 6, stop_tokens=())
    assert calls == {"forward": 1, "unchecked": 6}  # the prompt's, through forward, and five steps


def _prefilled(model, batch: int = 2, prompt: int = 5, max_len: int = 12):
    caches = model.make_caches(batch, max_len)
    tokens = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(tokens, positions=torch.arange(prompt), cache_positions=torch.arange(prompt), caches=caches,
              key_mask=None, last_only=True)
    return caches


def test_the_step_is_one_graph_with_fixed_shapes(model):
    """``fullgraph=True`` fails on any graph break (a value read back to the host, control flow
    on a tensor's value), and ``error_on_recompile`` on any shape or guard that changes between
    positions: the properties a CUDA graph capture of the step needs."""
    caches = _prefilled(model)
    counters = torch._dynamo.utils.counters
    torch._dynamo.reset()
    traced = torch.compile(run_step, backend="eager", fullgraph=True, dynamic=False)
    mask = torch.ones(2, 12, dtype=torch.bool)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for position in (5, 6, 7):
            token = torch.tensor([[position], [position + 1]])
            got = traced(model, caches, token, torch.tensor([position]), torch.tensor([position]), mask)
            assert got.shape == (2, model.config.vocab_size)
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def test_a_step_that_does_not_compile_runs_uncompiled(model, monkeypatch, capsys):
    def failing_compile(function, **options):
        def compiled(*args):
            raise RuntimeError("no C++ compiler")
        return compiled

    expected = model.generate([[1, 2, 3], [4, 5, 6]], 6, stop_tokens=())
    monkeypatch.setattr(decode_step.torch, "compile", failing_compile)
    assert model.generate([[1, 2, 3], [4, 5, 6]], 6, stop_tokens=(), compile=True) == expected
    err = capsys.readouterr().err
    assert err.count("did not compile (RuntimeError); running it uncompiled") == 1


@pytest.mark.slow
def test_the_compiled_step_gives_the_same_tokens(model):
    prompts = [[1, 2, 3, 4], [7, 8]]  # the second row is padded: the key mask goes through the step too
    assert model.generate(prompts, 8, stop_tokens=(), compile=True) == model.generate(prompts, 8, stop_tokens=())
