"""explain's step 1 shows an attention sink's share of the weight as a row of its own, on a tiny
random Llama whose layers are given sinks (no shipped model has them): the trace against the
softmax with the sink as one more column, the dict, the terminal table and the page."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from attnkit.analysis import explain as ex
from attnkit.analysis.explain_data import explanation, token_step
from attnkit.analysis.explain_page import page_payload
from attnkit.analysis.head_choice import choose_head
from attnkit.models.tokenizer import Tokens
from attnkit.nn import MultiHeadAttention

from explain_checkpoints import layer_qkv

N = 9


@pytest.fixture(scope="module")
def model():
    from attnkit.models import Llama, LlamaConfig

    torch.manual_seed(0)
    model = Llama(LlamaConfig.preset("tiny")).eval()
    for index, layer in enumerate(m for m in model.modules() if isinstance(m, MultiHeadAttention)):
        if index == 0:  # the first layer only: a model may mix layers with and without sinks
            layer.sinks = nn.Parameter(torch.randn(layer.n_heads) * 2.0)
    return model


def _ids():
    return list(range(3, 3 + N))


def _oracle(model, ids):
    """Per layer ``(weights (H, N, N), sink_share (H, N) or None)``: softmax over the scaled scores
    of the visible keys and the sink logit, by the definition."""
    out = []
    for layer, (q, k, v) in layer_qkv(model, ids):
        k = k.repeat_interleave(layer.n_heads // layer.n_kv_heads, 1)
        scale = layer.scale if layer.scale is not None else layer.head_dim ** -0.5
        scores = ((q @ k.transpose(-1, -2)) * scale)[0].masked_fill(~layer.pattern.mask(N, N), -math.inf)
        if layer.sinks is None:
            out.append((torch.softmax(scores, -1), None))
            continue
        sink = layer.sinks.detach().double()[:, None, None].expand(-1, N, 1)
        weights = torch.softmax(torch.cat([scores, sink], -1), -1)
        out.append((weights[..., :-1], weights[..., -1]))
    return out


@pytest.mark.parametrize("rows", [None, [0, 5, 8]])
def test_trace_gives_the_sink_its_share_and_step2_is_the_models_output(model, rows):
    traces = ex.trace(model, _ids(), rows=rows)
    held = list(range(N)) if rows is None else rows
    for t, (weights, sink) in zip(traces, _oracle(model, _ids())):
        torch.testing.assert_close(t.weights, weights[:, held], atol=1e-12, rtol=0)
        if sink is None:
            assert t.sink is None and t.sink_weight is None
            continue
        torch.testing.assert_close(t.sink_weight, sink[:, held], atol=1e-12, rtol=0)
        torch.testing.assert_close(t.weights.sum(-1) + t.sink_weight, torch.ones_like(t.sink_weight))
        assert float(t.sink_weight.min()) > 1e-3  # the sink takes a visible share
        assert float((t.output - t.actual).abs().max()) < 1e-5  # the model's forward had the sink too


@pytest.fixture(scope="module")
def data(model):
    ids = _ids()
    tokens = Tokens(ids, [f"t{i}" for i in ids], [False] * N, [(0, 0)] * N)
    traces = ex.trace(model, ids)
    return explanation(traces, tokens, text=" ".join(tokens.labels), token=6, token_note="test",
                       choice=choose_head(traces, tokens, 6), name="tiny llama with sinks", family="llama")


def test_the_dict_has_a_sink_row_and_weights_sum_to_one(model, data):
    (extra,) = data["step1"]["extra"]
    assert extra["label"] == "sink" and extra["scores"].shape == extra["weights"].shape == (2, 4, N)
    torch.testing.assert_close(extra["scores"][0], model.layers[0].attn.sinks.detach().double()[:, None].expand(4, N))
    assert torch.equal(extra["scores"][1], torch.full((4, N), -math.inf, dtype=torch.float64))  # layer 1: no sinks
    assert torch.equal(extra["weights"][1], torch.zeros(4, N, dtype=torch.float64))
    total = data["step1"]["weights"].sum(-1) + extra["weights"]
    torch.testing.assert_close(total, torch.ones_like(total))
    step = token_step(data, 0, 2, 6)
    ((label, score, weight),) = step.extra
    assert label == "sink" and score == pytest.approx(float(model.layers[0].attn.sinks[2].detach()))
    assert float(step.weights.sum()) + weight == pytest.approx(1.0)
    assert token_step(data, 1, 2, 6).extra == []  # a layer without sinks lists no sink row
    payload = page_payload(data)["step1"]["extra"]
    assert [e["label"] for e in payload] == ["sink"]


def test_terminal_step1_table_lists_the_sink(data):
    from rich.console import Console

    from attnkit.cli.explain import _step1_table

    step = token_step(data, 0, 2, 6)
    console = Console(width=120, file=io.StringIO())
    console.print(_step1_table(step, data["tokens"]["labels"], "causal", 16))
    lines = console.file.getvalue().splitlines()
    (sink_line,) = [line for line in lines if "sink" in line]
    assert f"{step.extra[0][1]:.2f}" in sink_line and f"{step.extra[0][2]:.3f}" in sink_line
    assert "sum to 1.000000" in console.file.getvalue()


def test_page_in_chromium_shows_the_sink_row(data, tmp_path):
    import shutil

    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        pytest.skip("no chromium or chromedriver on PATH")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    from attnkit.analysis.explain_page import write_page

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium")
    browser = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        write_page(data, tmp_path / "sinks.html")
        browser.get((tmp_path / "sinks.html").resolve().as_uri())
        browser.find_element(By.CSS_SELECTOR, '.cell[data-layer="0"][data-head="2"]').click()
        browser.find_element(By.CSS_SELECTOR, '#sentence .tok[data-pos="6"]').click()
        row = browser.find_element(By.CSS_SELECTOR, '#step1-table tr.extra[data-extra="sink"]')
        step = token_step(data, 0, 2, 6)
        assert abs(float(row.get_attribute("data-weight")) - step.extra[0][2]) < 1e-9
        assert f"{step.extra[0][2]:.3f}" in row.text
        caption = browser.find_element(By.CSS_SELECTOR, "#step1 .caption").text
        assert "over the visible keys and the sink; the weights sum to 1.000000" in caption
        browser.find_element(By.CSS_SELECTOR, '.cell[data-layer="1"][data-head="2"]').click()  # no sinks there
        assert not browser.find_elements(By.CSS_SELECTOR, "#step1-table tr.extra")
        caption = browser.find_element(By.CSS_SELECTOR, "#step1 .caption").text
        assert "over the visible keys; the weights sum to 1.000000" in caption
    finally:
        browser.quit()
