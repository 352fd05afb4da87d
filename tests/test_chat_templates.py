"""Chat templates come from the checkpoint: whatever one does (divides by zero, loops or recurses
without end, builds gigabytes) ends as one line naming its file, within a bounded time and memory;
transformers 5's ``chat_template.jinja`` and the list of named templates are read; a damaged
``tokenizer.json`` is named."""

from __future__ import annotations

import json

import pytest

from attnkit.cli import main
from attnkit.models.gguf_tokenizer import ChatTemplate
from attnkit.models.llama import Llama, LlamaConfig
from word_tokenizer import save_word_tokenizer

pytest.importorskip("jinja2")

ECHO = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def _render(source):
    return ChatTemplate(source, origin="/models/x/chat_template.jinja").render([{"role": "user", "content": "w1"}])


@pytest.mark.parametrize("source, message", [
    ("{{ 1 / 0 }}", "ZeroDivisionError: division by zero"),
    ("{{ 'a' * 10**10 }}", "'*' would build a value of about 10,000,000,000 items, more than 4,194,304"),
    ("{{ 10 ** (10 ** 10) }}", "'**' would build a value of about 20,000,000,000 items"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
     "'+' would build a value of about 8,388,608 items"),
    ("{% for i in range(10**9) %}{% endfor %}", "its range() calls produce more than 1,048,576 items"),
    ("{% for i in range(10**5) %}{% for j in range(10**5) %}{% endfor %}{% endfor %}",
     "its range() calls produce more than 1,048,576 items"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "it recurses too deeply"),
    ("{% for i in range(10**6) %}{{ 'a' * 10 }}{% endfor %}", "the prompt it renders is longer than 4,194,304"),
    ("{{ 'a' | center(10**10) }}", "center width 10,000,000,000 is more than 4,194,304"),
    ("{{ raise_exception('no system role') }}", "no system role"),
    ("{% if %}", "Expected an expression"),
], ids=["zero-division", "string-repeat", "power", "doubling", "huge-range", "nested-ranges", "recursion",
        "long-output", "center", "raise-exception", "syntax"])
def test_a_template_failing_in_any_way_is_a_value_error_naming_its_file(source, message):
    with pytest.raises(ValueError) as info:
        _render(source)
    assert str(info.value).startswith("/models/x/chat_template.jinja: chat template: ")
    assert message in str(info.value)


def test_templates_within_the_limits_render_as_before():
    assert _render("{{ 'ab' * 3 }}{{ 2 ** 10 }}{{ [1] + [2] }}{{ 'x' + 'y' }}{{ 1.5 * 2 }}") == "ababab1024[1, 2]xy3.0"


def _llama_dir(path, tokenizer_config=None, jinja=None):
    Llama(LlamaConfig.preset("tiny")).save_pretrained(path)
    save_word_tokenizer(path)
    if tokenizer_config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    if jinja is not None:
        (path / "chat_template.jinja").write_text(jinja)
    return path


def _chat(path):
    return ["generate", "--model", str(path), "--chat", "w1 w2", "--max-new-tokens", "1", "--no-pack"]


def _fails(capsys, argv, *fragments):
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnkit: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_a_failing_template_is_one_line_naming_its_file_through_the_cli(tmp_path, capsys):
    path = _llama_dir(tmp_path, jinja="{{ 'a' * 10**10 }}")
    _fails(capsys, _chat(path), f"{path / 'chat_template.jinja'}: chat template: '*' would build")


def test_chat_template_jinja_is_read_before_tokenizer_config(tmp_path):
    from attnkit.models.tokenizer import load_text_tokenizer

    path = _llama_dir(tmp_path, {"chat_template": "w9 {{ raise_exception('not this one') }}"}, jinja="w7 " + ECHO)
    assert load_text_tokenizer(path).chat_prompt("w3") == [7, 3]


def test_the_default_of_named_templates_is_the_chat_s(tmp_path):
    from attnkit.models.tokenizer import load_text_tokenizer

    named = [{"name": "tool_use", "template": "w8"}, {"name": "default", "template": "w5 " + ECHO}]
    assert load_text_tokenizer(_llama_dir(tmp_path, {"chat_template": named})).chat_prompt("w3") == [5, 3]


def test_named_templates_without_a_default_are_named_with_the_file(tmp_path, capsys):
    path = _llama_dir(tmp_path, {"chat_template": [{"name": "tool_use", "template": "w8"}]})
    _fails(capsys, _chat(path), f"{path / 'tokenizer_config.json'}: chat_template lists templates ['tool_use'] "
                                "but none named 'default'")


def test_a_damaged_tokenizer_json_is_named_by_explain(tmp_path, capsys):
    from attnkit.models.bert import default_model_dir

    source = default_model_dir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).symlink_to(source / name)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 7}}')
    _fails(capsys, ["explain", "a b c", "--model", str(tmp_path), "--out", str(tmp_path / "out")],
           f"{tmp_path / 'tokenizer.json'}: cannot load tokenizer")
