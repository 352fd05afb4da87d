"""The README answers what a new user asks first: which extra, which torch, what an option does."""

from __future__ import annotations

import argparse
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
