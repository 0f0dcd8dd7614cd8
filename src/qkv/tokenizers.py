"""Text ↔ token ids: one ``Tokenizer`` interface over Hugging Face ``tokenizers``, saved as ``tokenizer.json``.

Every kind (character-level here; byte-level BPE and WordPiece join it) is a ``tokenizers.Tokenizer`` underneath,
so encoding runs in Rust and the file format is the one the rest of the field reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from os.path import commonprefix
from pathlib import Path
from typing import Any

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as _Backend

__all__ = ["Tokenizer", "UnknownTokenError", "decode_continuation", "SEAM_CONTEXT", "BPE_VOCAB_SIZE"]

BPE_VOCAB_SIZE = 1024  # the byte-level BPE vocabulary size when none is given (Tokenizer.bpe, qkv train)


class UnknownTokenError(ValueError):
    """Text holds something the vocabulary cannot represent."""


class Tokenizer:
    """encode(text) → ids, decode(ids) → text, ``vocab_size``, special tokens, ``save``/``load``."""

    def __init__(self, backend: _Backend):
        # User text never produces special ids: a typed "<|endoftext|>" or "<|im_end|>" is encoded as the
        # characters it is (else a user could forge a turn boundary). Only the model's own markup (a template,
        # BOS/EOS added by the post-processor, ``encode(..., markup=True)``) yields them.
        backend.encode_special_tokens = True
        self.backend = backend
        self._markup_backend: _Backend | None = None

    # -- construction -----------------------------------------------------------------------------------------
    @classmethod
    def char(cls, text: str | Iterable[str], special_tokens: Iterable[str] = ()) -> Tokenizer:
        """One token per distinct character of ``text`` (sorted), then the special tokens, e.g. ``<pad>``."""
        chars = sorted(set(text if isinstance(text, str) else "".join(text)))
        if not chars:
            raise ValueError("cannot build a character tokenizer from empty text")
        vocab = {c: i for i, c in enumerate(chars)}
        for tok in special_tokens:
            vocab.setdefault(tok, len(vocab))
        backend = _Backend(models.WordLevel(vocab, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        backend.decoder = decoders.Fuse()
        if special_tokens:
            backend.add_special_tokens(list(special_tokens))
        return cls(backend)

    @classmethod
    def bpe(cls, text: str | Iterable[str], vocab_size: int = BPE_VOCAB_SIZE, special_tokens: Iterable[str] = (), *,
            min_frequency: int = 2) -> Tokenizer:
        """Byte-level BPE (GPT-2's scheme) trained on ``text``: start from the 256 bytes, merge the most frequent
        adjacent pair until the vocabulary holds ``vocab_size`` tokens. Any Unicode text encodes; nothing is unknown.
        """
        special_tokens = list(special_tokens)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet) + len(special_tokens):
            raise ValueError(
                f"vocab_size={vocab_size} is too small for byte-level BPE: it needs the {len(alphabet)} bytes "
                f"plus {len(special_tokens)} special token(s); use vocab_size >= {len(alphabet) + len(special_tokens)}"
            )
        backend = _Backend(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=special_tokens, initial_alphabet=alphabet,
                                      show_progress=False)
        backend.train_from_iterator(_chunks(text), trainer=trainer)
        return cls(backend)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Read a ``tokenizer.json`` (or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}; expected a tokenizer.json")
        try:
            return cls(_Backend.from_file(str(path)))
        except Exception as err:  # the Rust side raises plain Exceptions
            raise ValueError(f"{path} is not a valid tokenizer.json: {err}") from None

    def save(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        self.backend.save(str(path))

    # -- properties -------------------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """"char", "bpe", "wordpiece" or "unigram"."""
        model = type(self.backend.model).__name__  # no JSON round trip: encode() asks on every call
        return {"WordLevel": "char", "BPE": "bpe", "WordPiece": "wordpiece", "Unigram": "unigram"}.get(
            model, model.lower()
        )

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, index: int) -> str | None:
        return self.backend.id_to_token(index)

    def _special(self, *names: str) -> int | None:
        for name in names:
            index = self.backend.token_to_id(name)
            if index is not None:
                return index
        return None

    @property
    def pad_id(self) -> int | None:
        return self._special("<pad>", "[PAD]", "<|pad|>")

    @property
    def bos_id(self) -> int | None:
        return self._special("<bos>", "<s>", "[CLS]", "<|endoftext|>")

    @property
    def eos_id(self) -> int | None:
        return self._special("<eos>", "</s>", "[SEP]", "<|endoftext|>")

    @property
    def unk_id(self) -> int | None:
        return self._special("<unk>", "[UNK]")

    @property
    def mask_id(self) -> int | None:
        """The token masked-language modelling puts in place of a hidden token."""
        return self._special("<mask>", "[MASK]")

    @property
    def special_ids(self) -> list[int]:
        """Ids of every special (added) token."""
        return sorted(self.backend.get_added_tokens_decoder())

    # -- encoding ---------------------------------------------------------------------------------------------
    def _unknown(self, text: str) -> UnknownTokenError:
        vocab = self.backend.get_vocab()
        missing = sorted({c for c in text if c not in vocab})
        shown = ", ".join(repr(c) for c in missing[:10])
        return UnknownTokenError(
            f"text holds {len(missing)} character(s) this {self.vocab_size}-token character vocabulary lacks: "
            f"{shown}; remove them, or train the tokenizer on text that contains them"
        )

    def encode(self, text: str, *, add_special_tokens: bool = False, markup: bool = False) -> list[int]:
        """text → token ids. An unknown character is an ``UnknownTokenError``.

        Special-token strings typed in ``text`` (``<|endoftext|>``, ``<mask>``) are ordinary text: they encode to
        the tokens of their characters, never to a special id, so any text round-trips through ``decode``.
        ``add_special_tokens=True`` adds what the tokenizer's post-processor specifies (LLaMA's ``<s>``, BERT's
        ``[CLS] … [SEP]``): how a model's own prompts begin. ``markup=True`` is for the model's own markup (a chat
        template's output): there the special-token strings become their ids.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        backend = self._markup() if markup else self.backend
        try:
            ids = backend.encode(text, add_special_tokens=add_special_tokens).ids
        except Exception as err:
            if "unk" in str(err).lower() or "missing" in str(err).lower():
                raise self._unknown(text) from None
            raise
        unk = self.unk_id
        if unk is not None and self.kind == "char" and unk in ids:
            raise self._unknown(text)
        return ids

    def _markup(self) -> _Backend:
        """A twin of the backend that reads special-token strings as the special tokens (built once)."""
        if self._markup_backend is None:
            self._markup_backend = _Backend.from_str(self.backend.to_str())
            self._markup_backend.encode_special_tokens = False
        return self._markup_backend

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once (in parallel in Rust); special-token strings are text, as in :meth:`encode`."""
        try:
            return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        except Exception:
            return [self.encode(t) for t in texts]  # re-run one by one for a precise error

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def pieces(self, text: str, *, markup: bool = False) -> list[str]:
        """The text each token covers, in order: the labels of an attention map (``markup`` as in ``encode``)."""
        ids = self.encode(text, markup=markup)
        return [self.decode([i], skip_special_tokens=False) for i in ids]

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"


SEAM_CONTEXT = 8  # context tokens decoded before a continuation: enough for any decoder's seam rule


def decode_continuation(tokenizer: Any, context: Sequence[int], new: Sequence[int]) -> str:
    """The text ``new`` adds after ``context``: decode(context + new) minus decode(context).

    SentencePiece-style decoders (Metaspace, as LLaMA-2, TinyLlama and Mistral ship) drop the space that begins a
    text, so a continuation decoded on its own loses the space at the seam ("The capital is" + "Paris"); decoded
    after its context it keeps it. Only the last ``SEAM_CONTEXT`` context tokens are decoded: the seam is local.
    ``tokenizer`` is anything with ``decode(ids) -> str``.
    """
    context = list(context)[-SEAM_CONTEXT:]
    head = tokenizer.decode(context) if context else ""
    whole = tokenizer.decode(context + list(new))
    if not whole.startswith(head):  # the seam changed the context's own text (a character completed across it)
        head = commonprefix([head, whole])
    return whole[len(head):]


def _chunks(text: str | Iterable[str], lines_per_chunk: int = 1000) -> Iterable[str]:
    """Feed a long text to the Rust trainer in pieces of ``lines_per_chunk`` lines."""
    if not isinstance(text, str):
        yield from text
        return
    lines = text.splitlines(keepends=True)
    for start in range(0, len(lines), lines_per_chunk):
        yield "".join(lines[start:start + lines_per_chunk])
