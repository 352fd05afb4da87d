"""Hugging Face checkpoint I/O: parity with transformers both ways, sharding, config forms, errors."""

import json

import pytest
import torch
from llama_oracle import hf_config, hf_model, rel_error, transformers

from attnkit.models.llama.hf_checkpoint import config_from_hf, load_tokenizer, read_config
from attnkit.models.llama import Llama, LlamaConfig

CASES = [("mha", False), ("gqa", False), ("mqa", False), ("gqa", True), ("mqa", True)]


@pytest.mark.parametrize("shape,tied", CASES)
def test_load_transformers_checkpoint_matches_logits(tmp_path, shape, tied):
    hf = hf_model(hf_config(shape, tied=tied))
    hf.save_pretrained(tmp_path)
    ours = Llama.from_pretrained(tmp_path)
    assert ours.config.tie_embeddings == tied and (ours.lm_head is None) == tied
    tokens = torch.randint(0, 97, (2, 70), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = hf(tokens).logits, ours(tokens)
    assert rel_error(got, expected) < 1e-4


@pytest.mark.parametrize("shape,tied", [("gqa", False), ("mqa", True)])
def test_transformers_loads_our_checkpoint(tmp_path, shape, tied):
    source = hf_model(hf_config(shape, tied=tied), seed=3)
    source.save_pretrained(tmp_path / "hf")
    ours = Llama.from_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours")
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    tokens = torch.randint(0, 97, (1, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_error(loaded(tokens).logits, ours(tokens)) < 1e-4
        assert rel_error(loaded(tokens).logits, source(tokens).logits) < 1e-4


def test_rope_scaling_changes_logits(tmp_path):
    """The parity tests can fail: the same weights with plain rope give other logits."""
    scaled = hf_model(hf_config("gqa", scaled=True))
    plain = hf_model(hf_config("gqa", scaled=False))
    tokens = torch.randint(0, 97, (1, 64))
    with torch.no_grad():
        assert rel_error(scaled(tokens).logits, plain(tokens).logits) > 1e-2


def test_legacy_and_new_rope_forms_read_alike(tmp_path):
    legacy = json.loads(hf_config("gqa", legacy=True).to_json_string())
    legacy.pop("rope_parameters", None)
    legacy["rope_theta"] = 10000.0
    legacy["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    new = json.loads(hf_config("gqa").to_json_string())
    assert "rope_parameters" in new
    a, b = config_from_hf(legacy), config_from_hf(new)
    assert a == b and a.rope_scaling.original_max_position_embeddings == 16 and a.rope_theta == 10000.0


def test_sharded_roundtrip_in_bfloat16(tmp_path):
    model = Llama(LlamaConfig.preset("tiny")).to(torch.bfloat16)
    model.rope.reset_frequencies()
    model.save_pretrained(tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = Llama.from_pretrained(tmp_path)
    assert loaded.embed_tokens.weight.dtype == torch.bfloat16
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    tokens = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        assert torch.equal(model(tokens), loaded(tokens))
    assert Llama.from_pretrained(tmp_path, dtype=torch.float32).norm.weight.dtype == torch.float32


def test_loads_on_meta_then_in_place(tmp_path):
    Llama(LlamaConfig.preset("tiny")).save_pretrained(tmp_path)
    model = Llama.from_pretrained(tmp_path)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert model.rope.inv_freq.device.type == "cpu"


def _saved(tmp_path):
    Llama(LlamaConfig.preset("tiny")).save_pretrained(tmp_path)
    return tmp_path


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    path = _saved(tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors model\.layers\.1\.mlp\.up_proj\.weight"):
        Llama.from_pretrained(path)


def test_unexpected_and_misshaped_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    path = _saved(tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected tensors model\.layers\.0\.extra\.weight"):
        Llama.from_pretrained(path)
    del tensors["model.layers.0.extra.weight"]
    tensors["model.norm.weight"] = torch.zeros(3)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor model\.norm\.weight has shape \(3,\)"):
        Llama.from_pretrained(path)


def test_truncated_and_corrupt_files_name_the_file(tmp_path):
    path = _saved(tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        Llama.from_pretrained(path)
    (path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match=r"model\.safetensors: not a valid safetensors file"):
        Llama.from_pretrained(path)


def test_missing_files_and_bad_configs(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_config(tmp_path)
    path = _saved(tmp_path / "m")
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Llama.from_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    with pytest.raises(ValueError, match="unsupported architecture.*MistralForCausalLM"):
        config_from_hf({**config, "architectures": ["MistralForCausalLM"], "model_type": "mistral"})
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        config_from_hf({**config, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="missing field 'hidden_size'"):
        config_from_hf({k: v for k, v in config.items() if k != "hidden_size"})
    with pytest.raises(ValueError, match="config.json.*n_kv_heads"):
        config_from_hf({**config, "num_key_value_heads": 3})


def test_tokenizer_loaded_when_present(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    assert load_tokenizer(tmp_path) is None
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(tmp_path).encode("hello world").ids == [1, 2]
