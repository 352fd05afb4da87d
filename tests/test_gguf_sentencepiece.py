"""The SentencePiece BPE tokenizer of a GGUF file (``tokenizer.ggml.model = "llama"``): merges in
score order (file order for Gemma), byte fallback, the space prefix, BOS, Gemma's spelling of
space runs. The real Gemma 3 vocabulary is compared with transformers' in test_gemma3_270m.py."""

from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from attnkit.models.gguf_file import open_gguf  # noqa: E402
from attnkit.models.gguf_sentencepiece import derive_merges  # noqa: E402
from attnkit.models.gguf_tokenizer import tokenizer_from_gguf  # noqa: E402

NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6
# Merged pieces with their scores: by score "bc" merges first, then "▁a" (so "abc" -> ▁a bc);
# by file order "ab" merges first, then "abc" (-> ▁ abc).
PIECES = {"ab": -1.0, "abc": -3.0, "\u2581a": -2.0, "bc": -0.5, "  ": -4.0, "x": -5.0, "y": -5.0}


def _write(path: Path, arch: str, *, add_space_prefix=None, add_bos=None) -> Path:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581", "a", "b", "c"]
    scores = [0.0] * 3 + [0.0] * 256 + [-10.0, -6.0, -6.0, -6.0]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * 4
    tokens += list(PIECES)
    scores += list(PIECES.values())
    types += [NORMAL] * len(PIECES)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if add_space_prefix is not None:
        writer.add_add_space_prefix(add_space_prefix)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tokenizer(tmp_path, arch="llama", **flags):
    path = _write(tmp_path / f"{arch}.gguf", arch, **flags)
    return tokenizer_from_gguf(open_gguf(path), path)


def _pieces(tokenizer, text):
    return tokenizer.encode(text).tokens


def test_merges_follow_the_scores_and_bos_is_added(tmp_path):
    tokenizer = _tokenizer(tmp_path)
    assert _pieces(tokenizer, "abc") == ["<s>", "\u2581a", "bc"]
    assert _pieces(tokenizer, "abc abc") == ["<s>", "\u2581a", "bc", "\u2581a", "bc"]
    assert tokenizer.decode(tokenizer.encode("abc abc").ids, skip_special_tokens=True) == "abc abc"


def test_gemma_ranks_by_file_order_and_keeps_space_runs(tmp_path):
    gemma = _tokenizer(tmp_path, "gemma3")
    assert _pieces(gemma, "abc") == ["<s>", "\u2581", "abc"]
    assert "\u2581\u2581" in _pieces(gemma, "x  y")
    assert "\u2581\u2581" not in _pieces(_tokenizer(tmp_path, "llama"), "x  y")


def test_characters_outside_the_vocabulary_fall_back_to_bytes(tmp_path):
    tokenizer = _tokenizer(tmp_path)
    assert _pieces(tokenizer, "aé") == ["<s>", "\u2581a", "<0xC3>", "<0xA9>"]
    ids = tokenizer.encode("ab é🤖").ids
    assert 0 not in ids  # never the unknown token
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab é🤖"


def test_the_file_flags_turn_off_the_space_prefix_and_bos(tmp_path):
    tokenizer = _tokenizer(tmp_path, add_space_prefix=False, add_bos=False)
    assert _pieces(tokenizer, "abc") == ["abc"]  # bc, then abc: no "▁" in front
    assert tokenizer.decode(tokenizer.encode(" abc").ids) == " abc"


def test_merges_of_a_vocabulary(tmp_path):
    tokens = ["a", "b", "ab", "aab", "aa"]
    merges = derive_merges(tokens, [0.0, 0.0, -1.0, -2.0, -3.0])
    # Best piece first; "aab" has two cuts (aa|b, a|ab): the longer left part first.
    assert merges == [("a", "b"), ("aa", "b"), ("a", "ab"), ("a", "a")]
