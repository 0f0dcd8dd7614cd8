"""Corpus reading, the cached token file, the split, and batches that depend only on (seed, index)."""

import hashlib
import os

import numpy as np
import pytest

from qkv.data import BUNDLED, WindowBatches, encode_to_file, load_tokens, read_corpus, token_dtype
from qkv.tokenizers import Tokenizer


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path / "cache"))


def test_bundled_corpus_is_the_documented_file():
    corpus = read_corpus()
    assert corpus.source == BUNDLED
    assert hashlib.sha256(corpus.text.encode()).hexdigest() == (
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed")


def test_folder_of_text_files_is_read_in_name_order(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    assert read_corpus(tmp_path).text == "first\nsecond"


@pytest.mark.parametrize(("vocab", "dtype"), [(2, "uint8"), (256, "uint8"), (257, "uint16"), (65536, "uint16"),
                                              (65537, "uint32")])
def test_token_dtype_is_the_smallest_that_holds_every_id(vocab, dtype):
    assert token_dtype(vocab) == np.dtype(dtype)


def test_token_file_is_built_once_and_rebuilt_when_text_or_tokenizer_changes(tmp_path):
    corpus = read_corpus()
    corpus = type(corpus)(corpus.text[:20_000], "part")
    tok = Tokenizer.char(corpus.text)
    first = encode_to_file(corpus, tok)
    assert np.array_equal(np.asarray(first), tok.encode(corpus.text)) and first.dtype == np.uint8
    stamp = os.stat(first.filename).st_mtime_ns
    assert os.stat(encode_to_file(corpus, tok).filename).st_mtime_ns == stamp  # reused, not rewritten
    changed_text = encode_to_file(type(corpus)(corpus.text[:-1], "part"), tok)
    changed_tok = encode_to_file(corpus, Tokenizer.char(corpus.text, special_tokens=["<mask>"]))
    assert len({first.filename, changed_text.filename, changed_tok.filename}) == 3


def test_split_keeps_the_last_tenth_for_validation():
    corpus = type(read_corpus())("abcdefghij" * 100, "letters")
    splits = load_tokens(corpus, Tokenizer.char(corpus.text))
    assert len(splits.train) == 900 and len(splits.val) == 100
    assert Tokenizer.char(corpus.text).decode(splits.val.tolist()) == corpus.text[900:]


def test_batches_are_a_pure_function_of_seed_and_index_and_are_real_windows():
    tokens = np.arange(1000, dtype=np.uint16)
    data = WindowBatches(tokens, window=9, batch_size=4, seed=3)
    a, b = data.batch(5), WindowBatches(tokens, window=9, batch_size=4, seed=3).batch(5)
    assert a.equal(b) and not a.equal(data.batch(6)) and a.shape == (4, 9)
    assert (a[:, 1:] - a[:, :-1] == 1).all()  # consecutive tokens of the stream
    assert not a.equal(WindowBatches(tokens, window=9, batch_size=4, seed=4).batch(5))


def test_evaluation_batches_are_fixed_and_spread_over_the_split():
    data = WindowBatches(np.arange(1000, dtype=np.uint16), window=10, batch_size=8)
    batches = data.fixed(100)
    starts = np.concatenate([b[:, 0].numpy() for b in batches])
    assert len(starts) == 100 and starts[0] == 0 and starts[-1] == 990


def test_missing_empty_and_non_text_data_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_corpus(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        read_corpus(tmp_path / "empty.txt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no text files"):
        read_corpus(tmp_path / "folder")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        read_corpus(tmp_path / "latin1.txt")


def test_corpus_shorter_than_one_window_is_a_clear_error():
    with pytest.raises(ValueError, match="shorter than one context window"):
        WindowBatches(np.arange(10, dtype=np.uint8), window=65, batch_size=2)
