"""The character tokenizer: one id per character, exact round trips, clear errors, save and load."""

from __future__ import annotations

import json

import pytest

from qkv.tokenizers import Tokenizer, UnknownTokenError

TEXT = "The animal didn't cross the street because it was too tired.\n\tÉtat — naïve café ✓ 🙂  x"


def test_ids_are_the_sorted_characters() -> None:
    tok = Tokenizer.char(TEXT)
    reference = {c: i for i, c in enumerate(sorted(set(TEXT)))}  # computed here, independently
    assert tok.kind == "char"
    assert tok.vocab_size == len(tok) == len(reference)
    assert tok.encode(TEXT) == [reference[c] for c in TEXT]
    assert tok.pieces("cat ") == list("cat ")


@pytest.mark.parametrize("text", [TEXT, "", " ", "  the  street  ", "\n\n", "🙂é🙂", "it's", "the end."])
def test_round_trip_is_exact(text: str) -> None:
    tok = Tokenizer.char(TEXT)
    ids = tok.encode(text)
    assert len(ids) == len(text)  # one token per character, whitespace included
    assert tok.decode(ids) == text


def test_special_tokens_follow_the_characters() -> None:
    tok = Tokenizer.char("abc", special_tokens=["<pad>", "<bos>", "<eos>"])
    assert tok.vocab_size == 6
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (3, 4, 5)
    assert tok.encode("cab") == [2, 0, 1]
    assert tok.decode([tok.bos_id, 2, 0, 1, tok.eos_id, tok.pad_id]) == "cab"
    assert tok.decode([tok.bos_id, 0], skip_special_tokens=False) == "<bos>a"


def test_unknown_character_is_an_error_naming_it() -> None:
    tok = Tokenizer.char("hello world")
    with pytest.raises(UnknownTokenError, match=r"'Z'.*'!'|'!'.*'Z'") as info:
        tok.encode("hello Zorld!")
    assert isinstance(info.value, ValueError)  # so the CLI reports it on one line
    with pytest.raises(UnknownTokenError, match="'🙂'"):
        tok.encode_batch(["hello", "world 🙂"])
    with pytest.raises(TypeError, match="list"):
        tok.encode(["hello"])
    with pytest.raises(ValueError, match="empty text"):
        Tokenizer.char("")


def test_save_and_load_give_the_same_tokenizer(tmp_path) -> None:
    tok = Tokenizer.char(TEXT, special_tokens=["<pad>"])
    tok.save(tmp_path / "tokenizer.json")
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"]["type"] == "WordLevel"
    for where in (tmp_path / "tokenizer.json", tmp_path):  # the file, or the directory holding it
        loaded = Tokenizer.load(where)
        assert loaded.vocab_size == tok.vocab_size and loaded.pad_id == tok.pad_id
        assert loaded.encode(TEXT) == tok.encode(TEXT)
        assert loaded.decode(tok.encode(TEXT)) == TEXT
        with pytest.raises(UnknownTokenError, match="'Q'"):
            loaded.encode("Q")


def test_loading_a_missing_or_broken_file_says_what_is_wrong(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        Tokenizer.load(tmp_path / "nothing.json")
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Tokenizer.load(broken)
