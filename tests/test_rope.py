"""Rotary embedding: frequencies against transformers, scaling read from the config, rotation
properties, and the Meta (interleaved) checkpoint converter."""

import json

import pytest
import torch
from llama_oracle import hf_config

from attnkit.models.llama import Llama, LlamaConfig
from attnkit.models.llama.meta_checkpoint import interleaved_to_half_split, load_meta_checkpoint
from attnkit.nn.rope import Llama3RopeScaling, RotaryEmbedding, rope_frequencies


@pytest.mark.parametrize("factor,original", [(8.0, 16), (32.0, 8192)])
def test_frequencies_match_transformers_llama3(factor, original):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = hf_config("gqa")
    config.rope_parameters.update(factor=factor, original_max_position_embeddings=original, rope_theta=500000.0)
    expected, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    scaling = Llama3RopeScaling(factor=factor, original_max_position_embeddings=original)
    got = rope_frequencies(config.head_dim, 500000.0, scaling)
    torch.testing.assert_close(got.float(), expected, rtol=1e-6, atol=0)
    assert attention_factor == 1.0


def test_scaling_keeps_high_and_divides_low_frequencies():
    plain = rope_frequencies(128, 500000.0)
    scaled = rope_frequencies(128, 500000.0, Llama3RopeScaling(factor=32.0))
    wavelen = 2 * torch.pi / plain
    short, long = wavelen < 8192 / 4, wavelen > 8192 / 1
    assert short.any() and long.any() and (~short & ~long).any()
    torch.testing.assert_close(scaled[short], plain[short])
    torch.testing.assert_close(scaled[long], plain[long] / 32)
    middle = ~short & ~long
    assert ((scaled[middle] < plain[middle]) & (scaled[middle] > plain[middle] / 32)).all()


def test_rotation_keeps_norms_and_depends_on_relative_position():
    rope = RotaryEmbedding(16, 10000.0, Llama3RopeScaling(factor=8.0, original_max_position_embeddings=32))
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)

    def score(m, n):
        qm, _ = rope(q, q, torch.tensor([m]))
        _, kn = rope(k, k, torch.tensor([n]))
        return float((qm * kn).sum())

    assert score(100, 40) == pytest.approx(score(160, 100), rel=1e-5)
    assert score(100, 40) != pytest.approx(score(100, 41), rel=1e-3)
    rotated, _ = rope(q, k, torch.tensor([77]))
    assert float(rotated.norm()) == pytest.approx(float(q.norm()), rel=1e-6)
    per_row, _ = rope(q.expand(2, 1, 1, 16), k.expand(2, 1, 1, 16), torch.tensor([[3], [77]]))
    torch.testing.assert_close(per_row[1:], rotated)


def _meta_rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Meta's rotary: adjacent pairs (2f, 2f+1) as complex numbers times exp(i * pos * inv_freq[f])."""
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    turn = torch.polar(torch.ones_like(inv_freq), positions[:, None] * inv_freq)
    return torch.view_as_real(pairs * turn).flatten(-2)


def test_interleaved_weights_permute_to_the_same_scores():
    heads, head_dim, dim = 2, 8, 12
    wq = torch.randn(heads * head_dim, dim, dtype=torch.float64)
    x, pos = torch.randn(5, dim, dtype=torch.float64), torch.arange(5, dtype=torch.float64) * 7
    inv_freq = rope_frequencies(head_dim, 10000.0)
    meta = _meta_rotate((x @ wq.T).reshape(5, heads, head_dim).transpose(0, 1), pos, inv_freq)
    rope = RotaryEmbedding(head_dim, 10000.0).double()
    rope.inv_freq = inv_freq
    q = (x @ interleaved_to_half_split(wq, heads).T).reshape(1, 5, heads, head_dim).transpose(1, 2)
    ours, _ = rope(q, q, torch.arange(5) * 7)
    scores = lambda t: t @ t.transpose(-1, -2)  # noqa: E731  (per-head q.q products are layout-free)
    torch.testing.assert_close(scores(ours[0]).float(), scores(meta).float(), rtol=1e-5, atol=1e-5)


def _to_meta_layout(model: Llama) -> dict:
    """The inverse of the converter, written out with explicit row indices."""
    c = model.config
    def interleave(w, n):
        d = c.head_dim
        rows = [h * d + s * (d // 2) + f for h in range(n) for f in range(d // 2) for s in range(2)]
        return w[rows]
    state = {"tok_embeddings.weight": model.embed_tokens.weight, "norm.weight": model.norm.weight,
             "output.weight": model.head_weight}
    for i, layer in enumerate(model.layers):
        state |= {
            f"layers.{i}.attention_norm.weight": layer.attn_norm.weight,
            f"layers.{i}.attention.wq.weight": interleave(layer.attn.q_proj.weight, c.n_heads),
            f"layers.{i}.attention.wk.weight": interleave(layer.attn.k_proj.weight, c.n_kv_heads),
            f"layers.{i}.attention.wv.weight": layer.attn.v_proj.weight,
            f"layers.{i}.attention.wo.weight": layer.attn.o_proj.weight,
            f"layers.{i}.ffn_norm.weight": layer.mlp_norm.weight,
            f"layers.{i}.feed_forward.w1.weight": layer.mlp.gate_proj.weight,
            f"layers.{i}.feed_forward.w3.weight": layer.mlp.up_proj.weight,
            f"layers.{i}.feed_forward.w2.weight": layer.mlp.down_proj.weight,
        }
    return {k: v.detach().clone() for k, v in state.items()}


def test_meta_checkpoint_converts_to_the_same_model(tmp_path):
    config = LlamaConfig.preset("tiny")
    model = Llama(config).eval()
    torch.save(_to_meta_layout(model), tmp_path / "consolidated.00.pth")
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 256,
              "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match="use_scaled_rope.*rope_scaling"):
        load_meta_checkpoint(tmp_path)
    loaded = load_meta_checkpoint(tmp_path, rope_scaling=config.rope_scaling)
    tokens = torch.randint(0, 256, (1, 100))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens))


class NotATensor:
    """An arbitrary object a malicious checkpoint might pickle."""


def test_meta_checkpoint_refuses_pickled_objects(tmp_path):
    torch.save({"tok_embeddings.weight": torch.zeros(2, 2), "evil": NotATensor()}, tmp_path / "consolidated.00.pth")
    (tmp_path / "params.json").write_text(json.dumps({"dim": 2, "n_layers": 1, "n_heads": 1}))
    with pytest.raises(ValueError, match="consolidated.00.pth: cannot read it as a weights-only checkpoint"):
        load_meta_checkpoint(tmp_path)
