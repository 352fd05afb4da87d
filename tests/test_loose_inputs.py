"""Inputs people write loosely: token ids as numpy or tensor values are read as the ids they hold,
ids outside the vocabulary and an endless timeout are refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnkit.cli import main
from attnkit.models.generate import generate
from attnkit.models.llama import Llama, LlamaConfig
from word_tokenizer import save_word_tokenizer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Llama(LlamaConfig.preset("tiny")).eval()


def test_numpy_and_tensor_prompts_and_stop_tokens_are_read_as_their_ids(model):
    expected = generate(model, [[1, 2, 3]], max_new_tokens=4)
    for prompt in ([np.array([1, 2, 3])], np.array([[1, 2, 3]]), [torch.tensor([1, 2, 3])], [[np.int64(1), 2, 3]]):
        assert generate(model, prompt, max_new_tokens=4) == expected
    first = expected[0][3]
    for stops in (torch.tensor([first]), np.array([first]), [np.int32(first)]):
        assert generate(model, [[1, 2, 3]], max_new_tokens=4, stop_tokens=stops) == [[1, 2, 3, first]]


def test_float_ids_are_still_refused(model):
    with pytest.raises(ValueError, match="prompt 0 must hold integer token ids"):
        generate(model, [torch.tensor([1.0, 2.0])], max_new_tokens=1)


def test_decode_refuses_ids_outside_the_vocabulary_and_reads_arrays(model, tmp_path):
    from attnkit.models.tokenizer import load_text_tokenizer

    model.save_pretrained(tmp_path)
    save_word_tokenizer(tmp_path)
    tokenizer = load_text_tokenizer(tmp_path)
    assert tokenizer.decode(np.array([1, 2])) == tokenizer.decode(torch.tensor([1, 2])) == "w1 w2"
    for bad in (-1, 256, 2.0):
        with pytest.raises(ValueError, match=r"decode: token ids must be integers in \[0, 256\), got"):
            tokenizer.decode([1, bad])


@pytest.mark.parametrize("value", ["inf", "nan", "-1"])
def test_ring_refuses_a_timeout_that_is_not_a_positive_finite_number(value, capsys):
    assert main(["ring", "--timeout", value]) == 2
    assert capsys.readouterr().err == (f"attnkit: error: --timeout must be a positive, finite number of seconds, "
                                       f"got {float(value)}\n")
