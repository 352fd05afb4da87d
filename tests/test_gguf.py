"""GGUF loading on tiny files written with the gguf writer: config, every listed tensor type
(against transformers' own GGUF loader), the Q/K row order, tied heads, Llama 3 rope_freqs,
the tokenizer (against transformers' GGUF tokenizer) and the errors for bad files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gguf_files import CHAT_TEMPLATE, SPACED_CONTROL, T, gguf, tiny_config, tiny_model, vocabulary, write_gguf
from attnkit.models.gguf_file import open_gguf
from attnkit.models.llama.gguf_checkpoint import config_from_gguf, load_gguf
from attnkit.models.gguf_tokenizer import chat_template_from_gguf, tokenizer_from_gguf
from attnkit.models.llama.hf_checkpoint import hf_name
from attnkit.nn.rope import Llama3RopeScaling, rope_frequencies

transformers = pytest.importorskip("transformers")

LISTED_TYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_K, T.Q6_K]

TEXTS = [
    "Hello world",
    "  leading spaces and trailing   ",
    "The dog chased the ball.\nNew line\r\nWindows line\ttab\n\n\n",
    "Ünïcödé: naïve café, 日本語のテキスト, 한국어, emoji 🤖🚀👍🏽, Ελληνικά, русский",
    "def f(x):\n    return x ** 2  # square\n\nprint([f(i) for i in range(10)])",
    "Numbers 1234567890 3.14159 -42 1e-9 and 100,000; don't won't it's I'm we'll YOU'RE",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n <think> <|endoftext|>x",
    '{"json": [1, 2, {"a": null}]} <html><body>&amp;</body></html>',
]


@pytest.fixture(scope="module")
def model():
    return tiny_model(tiny_config())


def _hf_model(path):
    # transformers refuses to load a GGUF model without accelerate (its tokenizer needs none).
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF model")
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def test_f32_file_round_trips_exactly(tmp_path, model):
    """Names, shapes, the Q/K row order and the config, with no quantization in the way."""
    path = write_gguf(tmp_path / "m.gguf", model, T.F32)
    loaded = load_gguf(path)
    assert loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    tokens = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)


@pytest.mark.parametrize("kind", LISTED_TYPES, ids=lambda k: k.name)
def test_weights_equal_transformers_gguf_loading(tmp_path, model, kind):
    path = write_gguf(tmp_path / "m.gguf", model, kind)
    ours = load_gguf(path)
    theirs = _hf_model(path).state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, theirs[hf_name(name)]), f"{kind.name}: {name}"
    if kind in (T.F16, T.Q4_1, T.Q6_K):
        tokens = torch.randint(0, model.config.vocab_size, (1, 33), generator=torch.Generator().manual_seed(1))
        hf = _hf_model(path)
        with torch.no_grad():
            ours_logits, hf_logits = ours(tokens), hf(tokens).logits
        torch.testing.assert_close(ours_logits, hf_logits, rtol=0, atol=2e-4 * float(hf_logits.abs().max()))


def test_quantized_weights_follow_the_quantized_values(tmp_path, model):
    """A Q8_0 file holds the quantized original weights (Q/K rows restored to the original order)."""
    path = write_gguf(tmp_path / "m.gguf", model, T.Q8_0)
    loaded = load_gguf(path)
    q = model.layers[1].attn.q_proj.weight.detach()
    # Q8_0 keeps 8 bits per value and one float16 scale per 32: the error stays under half a
    # step plus the scale's own rounding (2**-11 relative, times up to 127 steps).
    step = q.abs().reshape(q.shape[0], -1, 32).amax(-1, keepdim=True) / 127
    error = (loaded.layers[1].attn.q_proj.weight.detach() - q).abs().reshape(q.shape[0], -1, 32)
    assert bool((error <= step * (0.5 + 127 * 2**-11)).all())
    assert float(error.max()) > 0  # it is the quantized model, not the original


def test_requested_dtype_and_tied_head(tmp_path):
    model = tiny_model(tiny_config(tie_embeddings=True))
    path = write_gguf(tmp_path / "m.gguf", model, T.F16)
    loaded = load_gguf(path, dtype=torch.bfloat16)
    assert loaded.config.tie_embeddings and loaded.lm_head is None
    assert loaded.embed_tokens.weight.dtype == torch.bfloat16
    as_float = load_gguf(path)
    assert torch.equal(loaded.embed_tokens.weight, as_float.embed_tokens.weight.bfloat16())


def test_config_from_metadata(tmp_path, model):
    config = tiny_config(n_heads=8, n_kv_heads=1, norm_eps=3e-6, rope_theta=123456.0, max_position_embeddings=300,
                         bos_token_id=0, eos_token_ids=(2,))
    path = write_gguf(tmp_path / "m.gguf", tiny_model(config), T.F32)
    loaded = config_from_gguf(open_gguf(path), path)
    assert (loaded.n_heads, loaded.n_kv_heads, loaded.head_dim, loaded.max_position_embeddings) == (8, 1, 32, 300)
    assert loaded.norm_eps == pytest.approx(3e-6) and loaded.rope_theta == 123456.0
    assert (loaded.bos_token_id, loaded.eos_token_ids, loaded.vocab_size) == (0, (2,), config.vocab_size)


def test_llama3_rope_freqs_tensor_becomes_rope_scaling(tmp_path):
    """llama.cpp stores Llama 3 scaling as per-pair divisors; positions beyond the original 64
    make a wrong recovery change the logits."""
    scaling = Llama3RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
    model = tiny_model(tiny_config(rope_scaling=scaling))
    divisors = (rope_frequencies(64, 10000.0, None) / rope_frequencies(64, 10000.0, scaling)).float()
    path = write_gguf(tmp_path / "m.gguf", model, T.F32, rope_freqs=divisors)
    loaded = load_gguf(path)
    stated = write_gguf(tmp_path / "stated.gguf", model, T.F32, rope_freqs=divisors,
                        metadata={"llama.rope.scaling.original_context_length": 64})
    assert load_gguf(stated).config.rope_scaling == scaling  # the fitted values, rounded back to 1.0 and 4.0
    torch.testing.assert_close(loaded.rope.inv_freq, model.rope.inv_freq, rtol=1e-6, atol=0)
    tokens = torch.randint(0, model.config.vocab_size, (1, 200), generator=torch.Generator().manual_seed(2))
    plain = tiny_model(tiny_config())  # the same weights without the scaling
    with torch.no_grad():
        logits = loaded(tokens)
        # inv_freq agrees to float32 rounding; at position 200 that moves an angle by ~1e-4 rad.
        torch.testing.assert_close(logits, model(tokens), rtol=0, atol=2e-4)
        assert float((logits - plain(tokens)).abs().max()) > 1e-2
    bumpy = divisors.clone()
    bumpy[3] *= 1.5
    bad = write_gguf(tmp_path / "bad.gguf", model, T.F32, rope_freqs=bumpy)
    with pytest.raises(ValueError, match="bad.gguf: rope_freqs"):
        load_gguf(bad)


def test_errors_name_the_file_and_the_problem(tmp_path, model):
    with pytest.raises(FileNotFoundError, match="nothing.gguf does not exist"):
        load_gguf(tmp_path / "nothing.gguf")
    text = tmp_path / "text.gguf"
    text.write_text("hello, not a model")
    with pytest.raises(ValueError, match=r"text.gguf: not a GGUF file"):
        load_gguf(text)
    good = write_gguf(tmp_path / "m.gguf", model, T.Q4_0).read_bytes()
    for name, cut in (("short_data.gguf", len(good) - 1000), ("short_header.gguf", 200)):
        (tmp_path / name).write_bytes(good[:cut])
        with pytest.raises(ValueError, match=f"{name}: .*truncated"):
            load_gguf(tmp_path / name)
    write_gguf(tmp_path / "phi.gguf", model, T.F32, arch="phi3")
    with pytest.raises(ValueError, match="phi.gguf: unsupported architecture 'phi3'"):
        load_gguf(tmp_path / "phi.gguf")
    write_gguf(tmp_path / "linear.gguf", model, T.F32, metadata={"llama.rope.scaling.type": "linear"})
    with pytest.raises(ValueError, match="linear.gguf: llama.rope.scaling.type 'linear' is not supported"):
        load_gguf(tmp_path / "linear.gguf")


def test_unsupported_tensor_type_is_named(tmp_path, model):
    path = tmp_path / "iq.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("block_count", 1), ("embedding_length", 256), ("feed_forward_length", 256),
                       ("attention.head_count", 4), ("vocab_size", 8)):
        writer.add_uint32(f"llama.{key}", value)
    block, size = gguf.GGML_QUANT_SIZES[T.IQ4_NL]
    writer.add_tensor("token_embd.weight", np.zeros((8, 256 // block * size), np.uint8), raw_dtype=T.IQ4_NL)
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(256, np.float32))  # the one layer block_count promises
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="iq.gguf: tensor token_embd.weight has type IQ4_NL"):
        load_gguf(path)


@pytest.mark.parametrize("pre,add_bos", [("smollm", False), ("llama-bpe", True)])
def test_tokenizer_ids_equal_transformers(tmp_path, model, pre, add_bos):
    path = write_gguf(tmp_path / "m.gguf", model, T.F16, pre=pre, add_bos=add_bos)
    reader = open_gguf(path)
    ours = tokenizer_from_gguf(reader, path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in TEXTS:
        ids = ours.encode(text).ids
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids), text
    assert (ours.encode("hi").ids[0] == 1) == add_bos
    template = chat_template_from_gguf(reader, path)
    assert template.source == CHAT_TEMPLATE
    messages = [{"role": "user", "content": "Ünïcödé 🤖 the cat"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "def f(): pass"}]
    text = template.render(messages)
    assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ours.encode(text, add_special_tokens=False).ids == list(ids)


def test_control_token_with_a_space_maps_to_its_id(tmp_path, model):
    """A control token whose text has a character outside the byte alphabet stays whole, both in
    text and in what a chat template writes, and decodes back to its text."""
    path = write_gguf(tmp_path / "m.gguf", model, T.F16, metadata={
        "tokenizer.chat_template": "{% for m in messages %}" + SPACED_CONTROL + "{{ m['content'] }}{% endfor %}"})
    reader = open_gguf(path)
    ours = tokenizer_from_gguf(reader, path)
    token_id = vocabulary()[0].index(SPACED_CONTROL)
    prompt = chat_template_from_gguf(reader, path).render([{"role": "user", "content": " the"}])
    ids = ours.encode(prompt, add_special_tokens=False).ids
    assert ids[0] == token_id and len(ids) == 2
    assert ours.decode(ids, skip_special_tokens=False) == prompt
    assert ours.decode(ids) == " the"
