"""The native decoding step on the two shipped GGUF models, against their torch step.

SmolLM2-135M (Q4_1 / Q8_0, GQA 9/3, fused q/k/v and gate/up) and Gemma 3 270M (Q4_K / Q5_0 / Q6_K /
Q8_0, MQA, window layers of 512 with rolling caches): 20 consecutive steps after a prompt give the
torch step's logits within float32 rounding (1e-4 of their scale) and greedy generation the same
tokens. Gemma's prompt of 505 tokens makes the steps cross its window of 512 (the rings wrap).
Oracle and tolerance as ``test_native_step.py``; skipped without the models' packages, Gemma
marked ``slow`` (its 262k-row vocabulary and a 505-token prefill take most of a minute here).
"""

from __future__ import annotations

import pytest

from real_models import GEMMA3, SMOLLM2, needs_gemma3, needs_smollm2
from test_native_step import _prompt, assert_steps_agree
from attnkit.kernels.native_step import native_step_available
from attnkit.models.generate import generate
from attnkit.models.registry import identify_causal

pytestmark = pytest.mark.skipif(not native_step_available(), reason="needs the native libraries (a C compiler)")


@pytest.mark.smollm2
@needs_smollm2
def test_smollm2_native_steps_and_tokens_equal_the_torch_step():
    model = identify_causal(SMOLLM2).load()
    assert model.layers[0].attn.fused_qkv is not None  # the loader fuses: the plan takes the fused blocks
    assert_steps_agree(model, _prompt(model, 24))
    prompt = [[1, 504, 3458, 282, 5248, 314, 253, 1233]]
    assert generate(model, prompt, 32, stop_tokens=()) == generate(model, prompt, 32, stop_tokens=(), native=False)


@pytest.mark.slow
@needs_gemma3
def test_gemma3_270m_native_steps_cross_the_window_and_tokens_equal_the_torch_step():
    model = identify_causal(GEMMA3).load()
    assert model.config.sliding_window == 512
    assert_steps_agree(model, _prompt(model, 505))
    prompt = [[2, 818, 5279, 529, 7001, 563]]
    assert generate(model, prompt, 32, stop_tokens=()) == generate(model, prompt, 32, stop_tokens=(), native=False)
