"""Damaged checkpoints fail fast, through the CLI, with one line naming the file: layer counts that
the tensors do not back, sizes no model has, JSON nested too deeply; and loose but meaningful
fields ("architectures" as one string) are read as meant."""

from __future__ import annotations

import json

import pytest

from attnkit.cli import main
from attnkit.models.llama import Llama, LlamaConfig
from word_tokenizer import save_word_tokenizer


def _fails(capsys, argv, *fragments):
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnkit: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _llama_dir(path, **config_changes):
    Llama(LlamaConfig.preset("tiny")).save_pretrained(path)
    save_word_tokenizer(path)
    file = path / "config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **config_changes}))
    return path


def _generate(path):
    return ["generate", "--model", str(path), "--prompt", "w1 w2", "--max-new-tokens", "1", "--no-pack"]


def test_a_corrupt_layer_count_in_config_json_fails_before_any_layer_is_built(tmp_path, capsys):
    path = _llama_dir(tmp_path, num_hidden_layers=100000)
    _fails(capsys, _generate(path), f"{path / 'config.json'}: num_hidden_layers is 100000, but the checkpoint holds "
                                    "tensors for 2 layers (0 to 1)")


def test_a_corrupt_layer_count_in_a_gguf_file_fails_before_any_layer_is_built(tmp_path, capsys):
    from gguf_files import T, tiny_config, tiny_model, write_gguf

    pytest.importorskip("tokenizers")
    path = write_gguf(tmp_path / "m.gguf", tiny_model(tiny_config()), T.F16, metadata={"llama.block_count": 100000})
    _fails(capsys, _generate(path), f"{path}: llama.block_count is 100000, but the checkpoint holds tensors for 2 layers")


def test_a_corrupt_layer_count_in_a_bert_config_fails_before_any_layer_is_built(tmp_path, capsys):
    from attnkit.models.bert import default_model_dir

    source = default_model_dir()
    (tmp_path / "tokenizer.json").symlink_to(source / "tokenizer.json")
    (tmp_path / "model.safetensors").symlink_to(source / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 100000}))
    _fails(capsys, ["explain", "a b c", "--model", str(tmp_path), "--out", str(tmp_path / "out")],
           f"{tmp_path / 'config.json'}: num_hidden_layers is 100000, but the checkpoint holds tensors for 6 layers")


def test_a_missing_layer_is_named(tmp_path, capsys):
    from gguf_files import T, tiny_config, tiny_model, write_gguf

    pytest.importorskip("tokenizers")
    model = tiny_model(tiny_config(n_layers=3))
    path = write_gguf(tmp_path / "m.gguf", model, T.F16, metadata={"llama.block_count": 4})
    _fails(capsys, _generate(path), "llama.block_count is 4, but the checkpoint holds tensors for 3 layers (0 to 2)")


@pytest.mark.parametrize("field, value, message", [
    ("intermediate_size", 2**62, "ffn_dim is 4611686018427387904, more than 16,777,216, which no model has"),
    ("vocab_size", 2**40, "vocab_size is 1099511627776, more than 16,777,216"),
    ("hidden_size", 1e30, "hidden_size must be an integer, got 1e+30 (a number)"),
], ids=["intermediate_size", "vocab_size", "hidden_size"])
def test_sizes_no_model_has_are_refused_naming_the_file(tmp_path, capsys, field, value, message):
    path = _llama_dir(tmp_path, **{field: value})
    _fails(capsys, _generate(path), f"{path / 'config.json'}: ", message)


def test_json_nested_too_deeply_names_the_file(tmp_path, capsys):
    path = _llama_dir(tmp_path)
    file = path / "config.json"
    file.write_text(json.dumps(json.loads(file.read_text()))[:-1] + ', "deep": ' + "[" * 100000 + "]" * 100000 + "}")
    _fails(capsys, _generate(path), f"{file}: cannot read it as JSON (arrays or objects nested too deeply)")


def test_architectures_as_one_string_is_read_as_a_list(tmp_path, capsys):
    path = _llama_dir(tmp_path, architectures="LlamaForCausalLM")
    assert main(_generate(path)) == 0
    capsys.readouterr()
    _llama_dir(tmp_path, architectures=7)
    _fails(capsys, _generate(path), "config.json: architectures must be a string or a list of strings, got 7")


def _gguf_file(tmp_path, change=None, **write_options):
    """A tiny GGUF file; ``change(reader)`` edits its header in place (tensor offsets, dims)."""
    from gguf_files import T, gguf, tiny_config, tiny_model, write_gguf

    pytest.importorskip("tokenizers")
    path = write_gguf(tmp_path / "m.gguf", tiny_model(tiny_config()), write_options.pop("kind", T.F16), **write_options)
    if change is not None:
        reader = gguf.GGUFReader(path, "r+")
        change(reader)
        reader.data.flush()
    return path


def _offset(reader, i):
    return reader.tensors[i].field.parts[5]


@pytest.mark.parametrize("change, message", [
    (lambda r: _offset(r, 1).__setitem__(0, _offset(r, 1)[0] + 2),
     "tensor blk.0.attn_norm.weight starts at data offset 145410, which is not a multiple of the file's alignment 32"),
    (lambda r: _offset(r, 2).__setitem__(0, _offset(r, 1)[0]),
     "tensors blk.0.attn_norm.weight and blk.0.attn_q.weight overlap in the file"),
    (lambda r: r.tensors[2].field.parts[3].__setitem__(1, 0),
     "tensor blk.0.attn_q.weight has a zero dimension (shape (0, 256))"),
], ids=["misaligned", "overlapping", "zero-dimension"])
def test_gguf_tensors_out_of_place_are_named_with_the_file(tmp_path, capsys, change, message):
    path = _gguf_file(tmp_path, change)
    _fails(capsys, _generate(path), f"{path}: {message}")


def test_a_zero_dimension_in_a_quantized_gguf_tensor_is_named_with_the_file(tmp_path, capsys):
    from gguf_files import T

    path = _gguf_file(tmp_path, lambda r: r.tensors[0].field.parts[3].__setitem__(0, 0), kind=T.Q8_0)
    _fails(capsys, _generate(path), f"{path}: tensor token_embd.weight has a zero dimension (shape (284, 0))")


@pytest.mark.parametrize("metadata, message", [
    ({"tokenizer.ggml.bos_token_id": 100000, "tokenizer.ggml.add_bos_token": True},
     "tokenizer.ggml.bos_token_id is 100000, not the id of one of the 284 tokens"),
    ({"tokenizer.ggml.eos_token_id": 2.0}, "tokenizer.ggml.eos_token_id must be an integer, got 2.0"),
], ids=["bos-beyond-the-vocabulary", "float-eos"])
def test_gguf_token_ids_that_are_not_ids_are_named_with_the_file(tmp_path, capsys, metadata, message):
    path = _gguf_file(tmp_path, metadata=metadata)
    _fails(capsys, _generate(path), f"{path}: GGUF metadata {message}")


def test_a_gguf_merge_without_a_space_is_named_with_the_file(tmp_path, capsys, monkeypatch):
    import gguf_files

    monkeypatch.setattr(gguf_files, "MERGES", [*gguf_files.MERGES, "nospace"])
    path = _gguf_file(tmp_path)
    _fails(capsys, _generate(path), f"{path}: GGUF metadata tokenizer.ggml.merges entry 23 ('nospace') is not two "
                                    "tokens separated by a space")
