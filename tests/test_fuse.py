"""Fused quantized projections (attnkit.models.fuse): one call where there were three (q/k/v) or
two (gate/up), the same values bit for bit, the same state dict, no extra memory."""

from __future__ import annotations

import torch

from gguf_files import T, tiny_config, tiny_model, write_gguf
from attnkit.models.fuse import fuse_quantized_projections
from attnkit.models.llama.gguf_checkpoint import load_gguf
from attnkit.models.quant import QuantizedLinear, set_quant_activations


def _unfused(model):
    """``model`` as it was before fusing: the layers' own projections, called one by one."""
    for layer in model.layers:
        layer.attn.fused_qkv = None
        layer.mlp.fused_gate_up = None
    return model


def test_a_quantized_file_loads_fused_and_computes_the_same_bits(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", tiny_model(tiny_config()), T.Q4_1)
    fused = load_gguf(path, quantized=True)
    plain = _unfused(load_gguf(path, quantized=True))
    assert fused.state_dict().keys() == plain.state_dict().keys()
    for layer in fused.layers:
        attn, mlp = layer.attn, layer.mlp
        assert attn.fused_qkv is not None and mlp.fused_gate_up is not None
        # each projection's blocks view its rows of one fused weight: nothing was copied twice
        q, k, v = attn.q_proj.blocks, attn.k_proj.blocks, attn.v_proj.blocks
        assert k.data_ptr() == q.data_ptr() + q.numel() and v.data_ptr() == k.data_ptr() + k.numel()
        assert mlp.up_proj.blocks.data_ptr() == mlp.gate_proj.blocks.data_ptr() + mlp.gate_proj.blocks.numel()
    tokens = torch.randint(0, fused.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(fused(tokens), plain(tokens))
        steps = [fused.make_caches(2, 7), plain.make_caches(2, 7)]
        for i in range(7):
            a = fused(tokens[:, i:i + 1], caches=steps[0])
            b = plain(tokens[:, i:i + 1], caches=steps[1])
            assert torch.equal(a, b)
        set_quant_activations(fused, "int8")  # reaches the fused calls too, through their first layers
        set_quant_activations(plain, "int8")
        assert torch.equal(fused(tokens[:, :1]), plain(tokens[:, :1]))
        assert not torch.equal(fused(tokens[:, :1]), _unfused(load_gguf(path, quantized=True))(tokens[:, :1]))


def test_mixed_formats_and_float_layers_stay_unfused(tmp_path):
    model = load_gguf(write_gguf(tmp_path / "m.gguf", tiny_model(tiny_config()), T.Q8_0), quantized=True)
    _unfused(model)
    attn = model.layers[0].attn
    v = attn.v_proj.blocks.numpy()
    # v_proj in another format: q/k/v are no longer one format, so they stay three calls
    attn.v_proj = QuantizedLinear(torch.zeros(v.shape[0], v.shape[1] // 34 * 20, dtype=torch.uint8), "Q4_1")
    assert fuse_quantized_projections(model) == 3  # layer 1's attention, both MLPs
    assert attn.fused_qkv is None and model.layers[1].attn.fused_qkv is not None
    floats = load_gguf(write_gguf(tmp_path / "f.gguf", tiny_model(tiny_config()), T.F32))
    assert fuse_quantized_projections(floats) == 0
