"""attnkit.lab: tasks correct by construction, runs that learn, repeat and resume exactly, variants
that differ only in attention, and the command end to end on a tiny preset."""

from __future__ import annotations

import copy
import json
from dataclasses import fields, replace

import pytest
import torch
import torch.nn.functional as F

from attnkit.analysis.llama_costs import parameters, report
from attnkit.cli import main
from attnkit.lab import presets as lab_presets
from attnkit.lab.decode import decode_tokens_per_s, layer_caches
from attnkit.lab.presets import ModelShape, Preset
from attnkit.lab.tasks import IGNORE, MQAR, StdlibText, is_validation_file, stdlib_files
from attnkit.lab.train import TrainSettings, build_model, train_run
from attnkit.lab.variants import cost, kept_keys, standard_variants
from attnkit.nn import KVCache, RollingKVCache
from attnkit.patterns import Causal, Fixed, SlidingWindow, Strided

SHAPE = ModelShape(dim=32, n_layers=2, n_heads=8, ffn_dim=48)
TEXT = StdlibText(seq_len=32, max_bytes=60_000)
SETTINGS = TrainSettings(steps=12, batch_size=8, lr=1e-2, warmup=2, eval_every=4, eval_sequences=16, checkpoint_every=5)


def _variants():
    return standard_variants(SHAPE.n_layers, SHAPE.n_heads, window=4, stride=4, summary=1)


def _strip_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("train_seconds", "train_tokens_per_s")}


# --- tasks -----------------------------------------------------------------------------------------

def test_mqar_answers_are_the_values_paired_with_the_queried_keys():
    task = MQAR(seq_len=40, n_pairs=6, n_keys=10, n_values=12)
    tokens, targets = task.batch(seed=3, step=5, batch=64)
    assert tokens.shape == targets.shape == (64, 40)
    for row, row_targets in zip(tokens.tolist(), targets.tolist()):
        # Read the pairs the slow way: walk the opening tokens two at a time.
        pairs = {}
        for position in range(0, 2 * task.n_pairs, 2):
            key, value = row[position], row[position + 1]
            assert 1 <= key <= task.n_keys and task.n_keys < value <= task.n_keys + task.n_values
            assert key not in pairs  # keys are distinct
            pairs[key] = value
        scored = [t for t, target in enumerate(row_targets) if target != IGNORE]
        assert len(scored) == task.n_pairs
        assert sorted(row[t] for t in scored) == sorted(pairs)  # every key is queried once
        for t in scored:
            assert row_targets[t] == pairs[row[t]] == row[t + 1]
        assert all(token == 0 for token in row[2 * task.n_pairs : scored[0]])  # filler in between


def test_mqar_is_a_function_of_seed_and_step_and_validation_is_fixed():
    task = MQAR()
    assert torch.equal(task.batch(1, 2, 8)[0], task.batch(1, 2, 8)[0])
    assert not torch.equal(task.batch(1, 2, 8)[0], task.batch(1, 3, 8)[0])
    assert torch.equal(task.validation(8)[0], task.validation(8)[0])


def test_mqar_rejects_impossible_settings():
    with pytest.raises(ValueError, match="n_pairs"):
        MQAR(n_pairs=20, n_keys=10)
    with pytest.raises(ValueError, match="seq_len"):
        MQAR(seq_len=10, n_pairs=4)


def test_stdlib_text_splits_by_file():
    files = stdlib_files()
    val = [f for f in files if is_validation_file(f)]
    assert val and len(val) < len(files)
    train_text, val_text = TEXT.texts()
    first_val, first_train = val[0].read_bytes()[:100], next(f for f in files if f not in val).read_bytes()[:100]
    assert bytes(val_text[:100].tolist()) == first_val
    assert bytes(train_text[:100].tolist()) == first_train
    x, y = TEXT.batch(0, 0, 4)
    assert torch.equal(x[:, 1:], y[:, :-1]) and x.shape == (4, 32)


# --- variants ----------------------------------------------------------------------------------------

def test_variants_differ_only_in_attention_and_match_arch():
    base = SHAPE.base_config(vocab_size=64, max_positions=256)
    mha = _variants()[0].config(base)
    mha_shapes = {k: v.shape for k, v in build_model(mha, 0).state_dict().items()}
    names = [v.name for v in _variants()]
    assert names == ["MHA", "GQA-4", "GQA-2", "MQA", "Window(4)", "Strided(4)", "Fixed(4,1)", "Mix(W4x1+Full)"]
    for variant in _variants():
        config = variant.config(base)
        for f in fields(config):
            if f.name not in ("n_kv_heads", "layer_patterns"):
                assert getattr(config, f.name) == getattr(mha, f.name), (variant.name, f.name)
        model = build_model(config, 0)
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        assert shapes.keys() == mha_shapes.keys()
        changed = {k for k in shapes if shapes[k] != mha_shapes[k]}
        assert changed <= {k for k in shapes if k.endswith(("k_proj.weight", "v_proj.weight"))}
        assert bool(changed) == (config.n_kv_heads != config.n_heads)
        c = cost(config, context=64)
        n_params = sum(p.numel() for p in model.parameters())
        assert c["parameters"] == n_params == parameters(config)["total"]
        arch = report(config, context=64)["kv_cache"][f"GQA ({config.n_kv_heads} kv)"]
        assert c["kv_bytes_per_token"] == arch["kv_bytes_per_token"]["bf16"]
        # by hand: K and V, 2 layers, Hkv heads of 4 dims, 2 bytes
        assert c["kv_bytes_per_token"] == 2 * 2 * config.n_kv_heads * 4 * 2
    mqa = _variants()[3].config(base)
    assert parameters(mha)["total"] - parameters(mqa)["total"] == 2 * 2 * 32 * 4 * (8 - 1)


def test_kept_keys_follow_the_pattern():
    assert kept_keys(None, 64) == kept_keys(Causal(), 64) == 64
    assert kept_keys(SlidingWindow(8), 64) == 7
    assert kept_keys(Strided(8), 64) == 64  # every residue class is read again later
    # Fixed(8, 2): the two summary columns of each of the 8 blocks; the next block starts fresh.
    assert kept_keys(Fixed(8, 2), 64) == 16
    config = _variants()[4].config(SHAPE.base_config(64, 256))
    assert cost(config, 64)["kv_bytes_per_token_at_context"] == pytest.approx(2 * 3 * (2 * 8 * 4 * 2) / 64)


@pytest.mark.parametrize("index", range(8))
def test_gradients_through_auto_backends_equal_the_reference(index):
    config = _variants()[index].config(SHAPE.base_config(vocab_size=64, max_positions=256))
    model = build_model(config, 0).double()
    reference = copy.deepcopy(model)
    for layer in reference.layers:
        layer.attn.backend = "reference"
    tokens = torch.randint(0, 64, (2, 37), generator=torch.Generator().manual_seed(0))
    grads = []
    for m in (model, reference):
        logits = m(tokens[:, :-1])
        F.cross_entropy(logits.reshape(-1, 64), tokens[:, 1:].reshape(-1)).backward()
        grads.append({k: p.grad for k, p in m.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-9, atol=1e-11, msg=name)


# --- training ----------------------------------------------------------------------------------------

def test_tiny_config_trains_and_its_loss_falls():
    config = SHAPE.base_config(vocab_size=256, max_positions=64)
    record = train_run(config, TEXT, SETTINGS, seed=0)
    losses = [p["loss"] for p in record["history"]]
    assert [p["step"] for p in record["history"]] == [0, 4, 8, 12]
    assert losses[-1] < losses[0] - 1.0  # from ~ln(256) = 5.5 down by more than a nat
    assert record["final"] == record["history"][-1] and record["train_tokens_per_s"] > 0


def test_same_seed_same_numbers_other_seed_other_numbers():
    config = _variants()[5].config(SHAPE.base_config(vocab_size=MQAR().vocab_size, max_positions=64))
    runs = [train_run(config, MQAR(), SETTINGS, seed=s) for s in (4, 4, 5)]
    assert _strip_timing(runs[0]) == _strip_timing(runs[1])
    assert _strip_timing(runs[0])["history"] != _strip_timing(runs[2])["history"]


def test_interrupted_run_resumes_from_its_checkpoint_exactly(tmp_path):
    config = _variants()[1].config(SHAPE.base_config(vocab_size=256, max_positions=64))
    whole = train_run(config, TEXT, SETTINGS, seed=1)

    def interrupt(step, loss):
        if step == 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_run(config, TEXT, SETTINGS, seed=1, checkpoint_dir=tmp_path, on_step=interrupt)
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["step"] == 5 and not state["done"]
    steps_seen = []
    resumed = train_run(config, TEXT, SETTINGS, seed=1, checkpoint_dir=tmp_path, on_step=lambda s, _: steps_seen.append(s))
    assert steps_seen == list(range(6, 13))
    assert _strip_timing(resumed) == _strip_timing(whole)
    # finished: returned from the checkpoint without training
    assert _strip_timing(train_run(config, TEXT, SETTINGS, seed=1, checkpoint_dir=tmp_path)) == _strip_timing(whole)
    with pytest.raises(ValueError, match="different run"):
        train_run(config, TEXT, SETTINGS, seed=2, checkpoint_dir=tmp_path)


# --- decode -------------------------------------------------------------------------------------------

@torch.no_grad()
def test_decode_caches_follow_the_layer_patterns_and_decode_exactly():
    config = _variants()[7].config(SHAPE.base_config(vocab_size=64, max_positions=256))
    model = build_model(config, 0)
    caches = layer_caches(model, 1, 40)
    assert isinstance(caches[0], RollingKVCache) and type(caches[1]) is KVCache
    for variant in (_variants()[6], _variants()[7]):
        model = build_model(variant.config(config), 0)
        tokens = torch.randint(0, 64, (1, 30), generator=torch.Generator().manual_seed(1))
        caches = layer_caches(model, 1, 30)
        model(tokens[:, :20], caches=caches)
        stepped = torch.cat([model(tokens[:, t : t + 1], caches=caches) for t in range(20, 30)], dim=1)
        torch.testing.assert_close(stepped, model(tokens)[:, 20:], rtol=1e-4, atol=1e-5)
    assert decode_tokens_per_s(model, context=24, new_tokens=3, repeats=1, prefill_chunk=10) > 0


# --- command ------------------------------------------------------------------------------------------

def test_lab_command_end_to_end_on_a_tiny_preset(tmp_path, monkeypatch, capsys):
    tiny = Preset(
        "quick", SHAPE, window=4, stride=4, summary=1, seeds=2,
        tasks=((MQAR(seq_len=16, n_pairs=2, n_keys=4, n_values=4), replace(SETTINGS, steps=3, eval_every=3)),
               (TEXT, replace(SETTINGS, steps=2, eval_every=1))),
        decode_context=24, decode_tokens=2,
    )
    monkeypatch.setitem(lab_presets.PRESETS, "quick", tiny)
    out = tmp_path / "lab"
    assert main(["lab", "--quick", "--device", "cpu", "--out", str(out), "--variants", "MHA,MQA,Window(4)"]) == 0
    result = json.loads((out / "lab.json").read_text())
    assert result["command"] == f"attnkit lab --quick --device cpu --out {out} --variants MHA,MQA,Window(4)"
    assert set(result["tasks"]) == {"mqar", "stdlib-bytes"}
    mqar = result["tasks"]["mqar"]["variants"]
    assert list(mqar) == ["MHA", "MQA", "Window(4)"] and len(mqar["MQA"]["runs"]) == 2
    assert mqar["MQA"]["cost"]["kv_bytes_per_token"] * 8 == mqar["MHA"]["cost"]["kv_bytes_per_token"]
    for name in ("lab_table.txt", "quality_vs_kv.png", "quality_vs_tokens.png"):
        assert (out / name).stat().st_size > 0
    assert "Window(4)" in (out / "lab_table.txt").read_text()
    assert main(["lab", "--quick", "--out", str(out), "--variants", "Nope"]) == 2
    assert "attnkit: error: lab: unknown variant 'Nope'" in capsys.readouterr().err
