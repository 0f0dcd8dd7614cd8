"""Byte-level BPE: trained locally with Hugging Face tokenizers, lossless on any Unicode text."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkv.data import read_corpus
from qkv.tokenizers import Tokenizer

CORPUS = read_corpus().text[:50_000]
_MASKED = Tokenizer.bpe(CORPUS[:5000], vocab_size=300, special_tokens=["<mask>"])


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.bpe(CORPUS, vocab_size=400)


@given(text=st.text(max_size=200))
def test_bpe_round_trips_arbitrary_unicode(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


SPECIAL_STRINGS = ["<mask>", "<|endoftext|>", "<|im_end|>"]
_CHAT = Tokenizer.bpe(CORPUS[:5000], vocab_size=300, special_tokens=SPECIAL_STRINGS)


@given(pieces=st.lists(st.text(max_size=20) | st.sampled_from(SPECIAL_STRINGS), max_size=8))
def test_typed_special_token_strings_are_text_and_round_trip(pieces):
    """User text never produces a special id: a typed "<|im_end|>" is its characters, and any text round-trips
    through the default decode (which drops special ids, so a forged one would vanish)."""
    text = "".join(pieces)
    ids = _CHAT.encode(text)
    assert not set(ids) & set(_CHAT.special_ids)
    assert _CHAT.decode(ids) == text
    assert [e for e in _CHAT.encode_batch([text])] == [ids]


@given(text=st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=60))
def test_markup_keeps_special_tokens_whole_and_round_trips(text):
    """The model's own markup (``markup=True``, e.g. a chat template's output) does become the special ids."""
    tok = _MASKED
    ids = tok.encode(text + "<mask>", markup=True)
    assert ids[-1] == tok.mask_id
    assert tok.decode(ids, skip_special_tokens=False) == text + "<mask>"


def test_bpe_vocabulary_has_the_requested_size_and_merges_frequent_pairs(bpe):
    assert bpe.vocab_size == 400 and bpe.kind == "bpe"
    sample = CORPUS[:5000]
    assert len(bpe.encode(sample)) < 0.7 * len(sample)  # merges make tokens longer than one byte


def test_bpe_saved_and_loaded_encodes_identically(bpe, tmp_path):
    bpe.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path)
    sample = "Shall I compare thee to a summer's day? ☀️ – ünïcödé"
    assert again.encode(sample) == bpe.encode(sample) and again.decode(again.encode(sample)) == sample


def test_bpe_vocabulary_smaller_than_the_bytes_is_refused():
    with pytest.raises(ValueError, match="vocab_size=100 is too small.*use vocab_size >= 257"):
        Tokenizer.bpe("abc", vocab_size=100, special_tokens=["<mask>"])


def test_char_tokenizer_keeps_its_api_and_gains_a_mask_token():
    tok = Tokenizer.char("hello", special_tokens=["<mask>"])
    assert tok.mask_id == 4 and tok.special_ids == [4]
    assert tok.decode(tok.encode("hello")) == "hello"
    typed = Tokenizer.char("<maskhello>", special_tokens=["<mask>"])
    assert typed.decode(typed.encode("he<mask>llo")) == "he<mask>llo"  # typed, it is six characters
    assert typed.mask_id not in typed.encode("he<mask>llo") and typed.encode("<mask>", markup=True) == [typed.mask_id]
