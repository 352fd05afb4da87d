"""Checkpoint files with loose or hostile fields: every error names the file and the field or tensor.

Covers the shared reader (:mod:`attnkit.models.checkpoint`) through each loader that uses it:
Hugging Face Llama directories (config.json, the safetensors index), Meta ``params.json`` and
BERT directories, plus the typed constructors of ``LlamaConfig`` and ``BertConfig``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from attnkit.cli import main
from attnkit.models.bert import Bert, BertConfig, default_model_dir
from attnkit.models.llama import Llama, LlamaConfig
from attnkit.models.llama.meta_checkpoint import load_meta_checkpoint


def _saved(path, **overrides):
    model = Llama(LlamaConfig.preset("tiny", **overrides))
    model.save_pretrained(path)
    return path, model


def _edit_json(file, **changes):
    raw = json.loads(file.read_text())
    raw.update(changes)
    file.write_text(json.dumps(raw))


# --- config.json types ---------------------------------------------------------------------------


def test_string_false_tie_word_embeddings_is_refused_not_read_as_true(tmp_path):
    path, _ = _saved(tmp_path)  # untied: the checkpoint has its own lm_head
    _edit_json(path / "config.json", tie_word_embeddings="false")
    with pytest.raises(ValueError, match=r'config\.json: tie_word_embeddings must be true or false, got "false" \(a string\)'):
        Llama.from_pretrained(path)


def test_string_false_tie_word_embeddings_through_the_cli(tmp_path, capsys):
    path, _ = _saved(tmp_path)
    _edit_json(path / "config.json", tie_word_embeddings="false")
    assert main(["arch", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("attnkit: error: ")
    assert "config.json: tie_word_embeddings must be true or false" in err and '"false"' in err


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("attention_bias", "false", r"attention_bias must be true or false, got \"false\" \(a string\)"),
        ("hidden_size", 64.0, r"hidden_size must be an integer, got 64\.0 \(a number\)"),
        ("num_hidden_layers", "2", r"num_hidden_layers must be an integer, got \"2\" \(a string\)"),
        ("num_attention_heads", True, r"num_attention_heads must be an integer, got true \(a boolean\)"),
        ("rms_norm_eps", "1e-5", r"rms_norm_eps must be a finite number, got \"1e-5\""),
        ("rope_theta", [10000], r"rope_theta must be a finite number, got \[10000\] \(a list\)"),
        ("vocab_size", None, r"vocab_size must be an integer, got null"),
        ("num_key_value_heads", 2.0, r"num_key_value_heads must be an integer, got 2\.0"),
        ("eos_token_id", "2", r"eos_token_id must be an integer or a list of integers"),
        ("bos_token_id", 1.5, r"bos_token_id must be an integer, got 1\.5"),
        ("model_type", 7, r"model_type must be a string, got 7"),
    ],
)
def test_config_field_of_the_wrong_type_names_file_field_and_value(tmp_path, field, value, message):
    path, _ = _saved(tmp_path)
    _edit_json(path / "config.json", **{field: value})
    with pytest.raises(ValueError, match=r"config\.json: " + message):
        Llama.from_pretrained(path)


@pytest.mark.parametrize("field", ["rope_theta", "rms_norm_eps"])
def test_a_number_beyond_float_range_names_file_and_field(tmp_path, field):
    # A JSON integer such as 1e400 written out in full: float() of it used to raise a bare OverflowError.
    path, _ = _saved(tmp_path)
    _edit_json(path / "config.json", **{field: 10**400})
    message = rf"config\.json: {field} must be a finite number, got 1000.*\.\.\. \(an integer\)"
    with pytest.raises(ValueError, match=message):
        Llama.from_pretrained(path)


def test_an_integer_too_long_to_read_names_the_file(tmp_path):
    # Python refuses to convert integers of over 4300 digits; json.loads raised that as a plain ValueError.
    path, _ = _saved(tmp_path)
    _edit_json(path / "config.json", rope_theta="HUGE")
    (path / "config.json").write_text((path / "config.json").read_text().replace('"HUGE"', "1" + "0" * 5000))
    with pytest.raises(ValueError, match=r"config\.json: cannot read it as JSON \(Exceeds the limit"):
        Llama.from_pretrained(path)


def test_llama_config_constructor_refuses_an_integer_beyond_float_range():
    with pytest.raises(ValueError, match=r"LlamaConfig: rope_theta must be finite, got 1000.*\.\.\.$"):
        LlamaConfig.preset("tiny", rope_theta=10**400)
    with pytest.raises(ValueError, match=r"LlamaConfig: norm_eps must be finite, got an integer of 16610 bits"):
        LlamaConfig.preset("tiny", norm_eps=10**5000)


@pytest.mark.parametrize(
    "rope_scaling, message",
    [
        ({"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}, r"missing field 'rope_scaling\.factor'"),
        ({"rope_type": "llama3", "factor": "8", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}, r"rope_scaling\.factor must be a finite number, got \"8\""),
        ({"rope_type": "llama3", "factor": 0.5, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}, r"rope_scaling: rope scaling factor must be >= 1"),
        (["llama3", 8.0], r"rope_scaling must be a JSON object, got \[\"llama3\", 8\.0\] \(a list\)"),
        ({"rope_type": 3}, r"rope_scaling\.rope_type must be a string"),
    ],
)
def test_rope_scaling_fields_name_file_and_field(tmp_path, rope_scaling, message):
    path, _ = _saved(tmp_path)
    _edit_json(path / "config.json", rope_scaling=rope_scaling)
    with pytest.raises(ValueError, match=r"config\.json: " + message):
        Llama.from_pretrained(path)


def test_llama_config_constructor_checks_types():
    with pytest.raises(TypeError, match="LlamaConfig: tie_embeddings must be True or False, got str 'false'"):
        LlamaConfig.preset("tiny", tie_embeddings="false")
    with pytest.raises(TypeError, match="LlamaConfig: norm_eps must be a number, got str '1e-5'"):
        LlamaConfig.preset("tiny", norm_eps="1e-5")
    with pytest.raises(TypeError, match="LlamaConfig: rope_theta must be a number, got bool True"):
        LlamaConfig.preset("tiny", rope_theta=True)
    with pytest.raises(TypeError, match="LlamaConfig: eos_token_ids must be a sequence of token ids, got int 2"):
        LlamaConfig.preset("tiny", eos_token_ids=2)


def test_numpy_numbers_are_stored_as_python_numbers():
    import numpy as np

    config = LlamaConfig.preset("tiny", dim=np.int64(64), norm_eps=np.float32(1e-5), tie_embeddings=np.bool_(True),
                                eos_token_ids=[np.int32(2)])
    assert type(config.dim) is int and type(config.norm_eps) is float and config.tie_embeddings is True
    assert config.eos_token_ids == (2,) and type(config.eos_token_ids[0]) is int
    assert config == LlamaConfig.preset("tiny", tie_embeddings=True, norm_eps=float(np.float32(1e-5)))


# --- safetensors index and weights ---------------------------------------------------------------


def _sharded(tmp_path):
    path = tmp_path / "model"
    Llama(LlamaConfig.preset("tiny")).save_pretrained(path, max_shard_bytes=40_000)
    return path, path / "model.safetensors.index.json"


def test_weight_map_as_a_list_and_integer_shard_names(tmp_path):
    path, index = _sharded(tmp_path)
    raw = json.loads(index.read_text())
    index.write_text(json.dumps({**raw, "weight_map": list(raw["weight_map"])}))
    with pytest.raises(ValueError, match=r"index\.json: weight_map must be an object of tensor name -> shard file, got .* \(a list\)"):
        Llama.from_pretrained(path)
    index.write_text(json.dumps({**raw, "weight_map": {**raw["weight_map"], "model.norm.weight": 5}}))
    with pytest.raises(ValueError, match=r"index\.json: weight_map\['model\.norm\.weight'\] must be a shard file name, got 5 \(an integer\)"):
        Llama.from_pretrained(path)
    index.write_text("{not json")
    with pytest.raises(ValueError, match=r"index\.json: not valid JSON"):
        Llama.from_pretrained(path)


@pytest.mark.parametrize("escape", ["../outside.safetensors", "sub/../../outside.safetensors", "ABSOLUTE"])
def test_index_entries_that_leave_the_checkpoint_directory_are_refused(tmp_path, escape):
    path, index = _sharded(tmp_path)
    raw = json.loads(index.read_text())
    shard = raw["weight_map"]["model.norm.weight"]
    outside = tmp_path / "outside.safetensors"
    shutil.copy(path / shard, outside)  # a loadable file, so only the path check can stop it
    escape = str(outside) if escape == "ABSOLUTE" else escape
    (path / "sub").mkdir()
    raw["weight_map"] = {name: escape if file == shard else file for name, file in raw["weight_map"].items()}
    index.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"index\.json: weight_map\[.*\] is .*outside.*; shard files must lie inside"):
        Llama.from_pretrained(path)


def test_shards_in_a_subdirectory_still_load(tmp_path):
    path, index = _sharded(tmp_path)
    raw = json.loads(index.read_text())
    (path / "shards").mkdir()
    for file in set(raw["weight_map"].values()):
        (path / file).rename(path / "shards" / file)
    raw["weight_map"] = {name: f"shards/{file}" for name, file in raw["weight_map"].items()}
    index.write_text(json.dumps(raw))
    assert Llama.from_pretrained(path).config == LlamaConfig.preset("tiny")


def test_an_integer_weight_names_file_tensor_and_dtype(tmp_path):
    from safetensors.torch import load_file, save_file

    path, _ = _saved(tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int64)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor model\.norm\.weight has dtype int64; weights must be floating point"):
        Llama.from_pretrained(path)


# --- Meta params.json ----------------------------------------------------------------------------


def _meta_dir(tmp_path, params):
    config = LlamaConfig.preset("tiny", rope_scaling=None)
    model = Llama(config)
    state = {"tok_embeddings.weight": model.embed_tokens.weight.detach(), "norm.weight": model.norm.weight.detach(),
             "output.weight": model.lm_head.weight.detach()}
    meta_names = {"attn_norm": "attention_norm", "attn.q_proj": "attention.wq", "attn.k_proj": "attention.wk",
                  "attn.v_proj": "attention.wv", "attn.o_proj": "attention.wo", "mlp_norm": "ffn_norm",
                  "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2"}
    for i, layer in enumerate(model.layers):
        for ours, theirs in meta_names.items():
            state[f"layers.{i}.{theirs}.weight"] = layer.get_submodule(ours).weight.detach()
    torch.save(state, tmp_path / "consolidated.00.pth")
    (tmp_path / "params.json").write_text(params if isinstance(params, str) else json.dumps(params))
    return tmp_path


_PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "norm_eps": 1e-5, "rope_theta": 500000.0}


def test_meta_params_that_load(tmp_path):
    assert load_meta_checkpoint(_meta_dir(tmp_path, _PARAMS)).config.n_kv_heads == 2


@pytest.mark.parametrize(
    "params, message",
    [
        ("{'dim': 64}", r"params\.json: not valid JSON"),
        ({k: v for k, v in _PARAMS.items() if k != "n_heads"}, r"params\.json: missing field 'n_heads'"),
        ({**_PARAMS, "n_heads": "4"}, r"params\.json: n_heads must be an integer, got \"4\" \(a string\)"),
        ({**_PARAMS, "use_scaled_rope": "false"}, r"params\.json: use_scaled_rope must be true or false"),
        ({**_PARAMS, "norm_eps": "1e-5"}, r"params\.json: norm_eps must be a finite number"),
        ({**_PARAMS, "n_heads": 3}, r"params\.json: LlamaConfig: n_kv_heads \(2\) must divide n_heads \(3\)"),
        ([64, 2], r"params\.json: expected a JSON object, got \[64, 2\] \(a list\)"),
    ],
)
def test_bad_meta_params_name_file_and_field(tmp_path, params, message):
    with pytest.raises(ValueError, match=message):
        load_meta_checkpoint(_meta_dir(tmp_path, params))


def test_meta_integer_weight_is_named(tmp_path):
    path = _meta_dir(tmp_path, _PARAMS)
    state = torch.load(path / "consolidated.00.pth", weights_only=True)
    state["norm.weight"] = state["norm.weight"].to(torch.int64)
    torch.save(state, path / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"consolidated\.00\.pth: tensor norm\.weight has dtype int64"):
        load_meta_checkpoint(path)


# --- BERT ----------------------------------------------------------------------------------------


def test_bert_config_fields_are_type_checked():
    with pytest.raises(ValueError, match=r"my/config\.json: num_hidden_layers must be an integer, got \"6\" \(a string\)"):
        BertConfig.from_dict({"num_hidden_layers": "6"}, "my/config.json")
    with pytest.raises(ValueError, match=r"config\.json: layer_norm_eps must be a finite number, got true"):
        BertConfig.from_dict({"layer_norm_eps": True})
    with pytest.raises(ValueError, match=r"config\.json: hidden_act must be a string, got \[\"gelu\"\]"):
        BertConfig.from_dict({"hidden_act": ["gelu"]})
    with pytest.raises(TypeError, match="BertConfig: layer_norm_eps must be a number, got bool True"):
        BertConfig(layer_norm_eps=True)


def _bert_dir_with_weights(tmp_path, data: bytes):
    source = default_model_dir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(source / name, tmp_path / name)
    (tmp_path / "model.safetensors").write_bytes(data)
    return tmp_path


@pytest.mark.parametrize("data", [b"\xff" * 64, b"\x00" * 7], ids=["garbage-header", "truncated-header"])
def test_corrupt_bert_weights_name_the_file(tmp_path, data):
    path = _bert_dir_with_weights(tmp_path, data)
    with pytest.raises(ValueError, match=r"model\.safetensors: not a valid safetensors file"):
        Bert.from_pretrained(path)


def test_corrupt_bert_weights_through_explain_cli(tmp_path):
    (tmp_path / "m").mkdir()
    path = _bert_dir_with_weights(tmp_path / "m", b"\xff" * 64)
    result = subprocess.run(
        [sys.executable, "-m", "attnkit.cli", "explain", "--model", str(path), "--out", str(tmp_path / "out"),
         "The cat sat on the mat."],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnkit: error: ")
    assert f"{path / 'model.safetensors'}: not a valid safetensors file" in lines[0]
