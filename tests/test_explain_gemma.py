"""``attnkit explain`` on a Gemma 3 layout: multi-query heads, window and global layers, and a score
scale of its own (``query_pre_attn_scalar``), on a tiny random model: the traced weights equal
``reference_attention``'s at the layer's scale and step 2 equals the model's own forward."""

from __future__ import annotations

import torch

from attnkit.analysis.explain_data import token_step
from attnkit.analysis.explain_page import page_payload
from explain_checkpoints import GEMMA_WINDOW, reference_weights, tiny_gemma3_explanation

N, TOKEN = 12, 10


def test_gemma3_mqa_windows_and_its_scale_are_explained_exactly():
    model, data = tiny_gemma3_explanation(N, TOKEN)
    assert data["model"]["attention"] == "MQA" and data["model"]["heads"] == "4 query heads sharing 1 KV head"
    assert data["notes"]["heads"].startswith("multi-query attention")
    assert [(layer["pattern"], layer["kind"]) for layer in data["layers"]] == [
        (f"window {GEMMA_WINDOW}", "window"), (f"window {GEMMA_WINDOW}", "window"), ("causal", "global")]
    assert f"layers 0–1: window {GEMMA_WINDOW}; layer 2: causal" in data["notes"]["patterns"]
    assert all(abs(layer["scale"] - 24 ** -0.5) < 1e-15 for layer in data["layers"])
    for layer, expected in enumerate(reference_weights(model, data["tokens"]["ids"])):
        torch.testing.assert_close(data["step1"]["weights"][layer], expected, atol=1e-10, rtol=0)
        for head in range(4):
            assert token_step(data, layer, head, TOKEN).max_error < 1e-5  # step 2 = the model's own heads
    allowed = data["step1"]["allowed"][0, 0, TOKEN]
    assert allowed.tolist() == [TOKEN - GEMMA_WINDOW < j <= TOKEN for j in range(N)]  # the window hides the rest
    assert page_payload(data)["layers"][0]["kind"] == "window"
