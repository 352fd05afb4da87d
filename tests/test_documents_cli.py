"""Packed documents on the command line: the ``document:LENGTHS`` spellings and ``attnkit patterns``."""

from __future__ import annotations

import pytest

from attnkit import Causal, Document
from attnkit.cli import main
from attnkit.cli.pattern_args import parse_titled_pattern


def test_document_spellings_build_the_patterns():
    assert parse_titled_pattern("document:3,0,5") == ("documents 3,0,5", Document([3, 0, 5]))
    assert parse_titled_pattern("causal-document:4") == ("causal in documents 4", Causal() & Document([4]))


def test_patterns_draws_documents_at_the_length_they_cover(capsys, tmp_path):
    assert main(["patterns", "causal-document:3,0,2", "--out", str(tmp_path / "doc.png")]) == 0
    out = capsys.readouterr().out
    assert "#....\n##...\n###..\n...#.\n...##\n" in out
    assert "cost at N=5" in out and (tmp_path / "doc.png").stat().st_size > 0


@pytest.mark.parametrize("argv, message", [
    (["document:3,-1"], "kind must be one of"),
    (["document:3,,1"], "kind must be one of"),
    (["document:"], "kind must be one of"),
    (["document:0,0"], "kind document:0,0: the documents cover no token"),
    (["causal-document:3,1", "-n", "5"], "kind causal-document:3,1: the documents cover 4 tokens; give -n 4"),
    (["document:2,2", "--at", "64"], "the documents cover 4 tokens; give --at 4 or leave it out"),
])
def test_bad_document_spellings_exit_2_in_one_line(argv, message, capsys):
    assert main(["patterns", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnkit: error: ") and message in err and err.count("\n") == 1
