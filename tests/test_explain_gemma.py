"""``attnkit explain`` on a Gemma 3 layout: multi-query heads, window and global layers, and a score
scale of its own (``query_pre_attn_scalar``), on a tiny random model: the traced weights equal
``reference_attention``'s at the layer's scale and step 2 equals the model's own forward."""

from __future__ import annotations

import torch

from attnkit.analysis import explain as ex
from attnkit.analysis.explain_data import explanation, token_step
from attnkit.analysis.explain_page import page_payload
from attnkit.analysis.head_choice import choose_head
from attnkit.models.gemma3 import Gemma3, Gemma3Config
from attnkit.models.tokenizer import Tokens
from explain_checkpoints import reference_weights

N, WINDOW, TOKEN = 12, 4, 10


def _tiny_gemma() -> Gemma3:
    torch.manual_seed(0)
    config = Gemma3Config(dim=48, n_layers=3, n_heads=4, n_kv_heads=1, head_dim=16, ffn_dim=80, vocab_size=64,
                          bos_token_id=1, eos_token_ids=(2,), sliding_window=WINDOW, query_pre_attn_scalar=24,
                          layer_types=("sliding_attention", "sliding_attention", "full_attention"))
    return Gemma3(config).eval()


def test_gemma3_mqa_windows_and_its_scale_are_explained_exactly():
    model = _tiny_gemma()
    ids = list(range(3, 3 + N))
    tokens = Tokens(ids, [f"t{i}" for i in ids], [False] * N, [(0, 0)] * N)
    traces = ex.trace(model, ids)
    data = explanation(traces, tokens, text=" ".join(tokens.labels), token=TOKEN, token_note="test",
                       choice=choose_head(traces, tokens, TOKEN), name="tiny gemma3", family="gemma3")
    assert data["model"]["attention"] == "MQA" and data["model"]["heads"] == "4 query heads sharing 1 KV head"
    assert data["notes"]["heads"].startswith("multi-query attention")
    assert [(layer["pattern"], layer["kind"]) for layer in data["layers"]] == [
        (f"window {WINDOW}", "window"), (f"window {WINDOW}", "window"), ("causal", "global")]
    assert "layers 0–1: window 4; layer 2: causal" in data["notes"]["patterns"]
    assert all(abs(layer["scale"] - 24 ** -0.5) < 1e-15 for layer in data["layers"])
    for layer, expected in enumerate(reference_weights(model, ids)):
        torch.testing.assert_close(data["step1"]["weights"][layer], expected, atol=1e-10, rtol=0)
        for head in range(4):
            assert token_step(data, layer, head, TOKEN).max_error < 1e-5  # step 2 = the model's own heads
    allowed = data["step1"]["allowed"][0, 0, TOKEN]
    assert allowed.tolist() == [TOKEN - WINDOW < j <= TOKEN for j in range(N)]  # the window hides the rest
    assert page_payload(data)["layers"][0]["kind"] == "window"
