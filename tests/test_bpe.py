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


@given(text=st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=60))
def test_bpe_with_special_tokens_round_trips_and_keeps_them_whole(text):
    tok = _MASKED
    ids = tok.encode(text + "<mask>")
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
