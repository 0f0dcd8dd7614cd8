"""Text ↔ token ids: one ``Tokenizer`` interface over Hugging Face ``tokenizers``, saved as ``tokenizer.json``.

Every kind (character-level here; byte-level BPE and WordPiece join it) is a ``tokenizers.Tokenizer`` underneath,
so encoding runs in Rust and the file format is the one the rest of the field reads.

A tokenizer also carries its **roles** (:class:`TokenRoles`): which token begins a text (``bos``), ends one
(``eos``), pads, stands for the unknown, which tokens end a reply (``<|im_end|>``, ``<|eot_id|>``) and the chat
template, as its files state them: Hugging Face's ``tokenizer_config.json``, ``special_tokens_map.json``,
``chat_template.jinja`` and ``generation_config.json`` (GGUF metadata in ``qkv.interop.gguf``). A directory save
writes them back the way Hugging Face does. Only for a role the files say nothing about is the token guessed from
its name (``<bos>``, ``<s>``, ``[CLS]``, ...).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from os.path import commonprefix
from pathlib import Path
from typing import Any

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as _Backend

__all__ = ["Tokenizer", "TokenRoles", "UnknownTokenError", "decode_continuation", "IncrementalText", "SEAM_CONTEXT",
           "BPE_VOCAB_SIZE", "ROLE_FILES"]

BPE_VOCAB_SIZE = 1024  # the byte-level BPE vocabulary size when none is given (Tokenizer.bpe, qkv train)

ROLES = ("bos", "eos", "pad", "unk", "mask")
# The files beside tokenizer.json that state the roles, as transformers writes and reads them.
TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP = "tokenizer_config.json", "special_tokens_map.json"
CHAT_TEMPLATE_FILE, GENERATION_CONFIG = "chat_template.jinja", "generation_config.json"
ROLE_FILES = (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, CHAT_TEMPLATE_FILE, GENERATION_CONFIG)
END_OF_TURN_KEY = "end_of_turn_tokens"  # qkv's key in tokenizer_config.json (transformers keeps unknown keys)
_GUESSES = {"bos": ("<bos>", "<s>", "[CLS]", "<|endoftext|>"), "eos": ("<eos>", "</s>", "[SEP]", "<|endoftext|>"),
            "pad": ("<pad>", "[PAD]", "<|pad|>"), "unk": ("<unk>", "[UNK]"), "mask": ("<mask>", "[MASK]")}


class UnknownTokenError(ValueError):
    """Text holds something the vocabulary cannot represent."""


@dataclass(frozen=True)
class TokenRoles:
    """What a tokenizer's own files say its special tokens are for.

    ``bos``, ``eos``, ``pad``, ``unk``, ``mask``: a token string or None. ``declared`` names the roles the files
    stated, None included: a file saying ``"bos_token": null`` (Qwen2) means "no BOS", and no name is guessed for
    it. ``end_of_turn``: the tokens that end a reply besides ``eos`` (``<|eot_id|>``, ``<|eom_id|>``; the extra
    ``eos_token_id`` entries of ``generation_config.json``); ``chat_template``: the model's Jinja chat template.
    """

    bos: str | None = None
    eos: str | None = None
    pad: str | None = None
    unk: str | None = None
    mask: str | None = None
    end_of_turn: tuple[str, ...] = ()
    chat_template: str | None = None
    declared: frozenset[str] = field(default_factory=frozenset)

    def says(self, role: str) -> bool:
        """Do the files state ``role`` (one of bos, eos, pad, unk, mask)?"""
        return role in self.declared

    def __bool__(self) -> bool:
        return bool(self.declared or self.end_of_turn or self.chat_template)

    @classmethod
    def of(cls, *, end_of_turn: Iterable[str] = (), chat_template: str | None = None,
           **tokens: str | None) -> TokenRoles:
        """Roles stated in code: ``TokenRoles.of(bos="<s>", eos="</s>", chat_template=...)``."""
        unknown = sorted(set(tokens) - set(ROLES))
        if unknown:
            raise ValueError(f"unknown token role(s) {', '.join(unknown)}; the roles are {', '.join(ROLES)}")
        return cls(**tokens, end_of_turn=tuple(end_of_turn), chat_template=chat_template,
                   declared=frozenset(tokens))

    @classmethod
    def read(cls, directory: str | Path, id_to_token: Callable[[int], str | None]) -> TokenRoles:
        """The roles stated by the Hugging Face files in ``directory`` (none: empty roles).

        ``tokenizer_config.json`` first, then ``special_tokens_map.json``, then ``generation_config.json``'s ids
        (``eos_token_id`` may be a list: its first entry is eos unless a tokenizer file names one, and every
        entry ends a turn); the chat template from ``chat_template.jinja``, else ``tokenizer_config.json``.
        """
        directory = Path(directory)
        config, special, generation = (_read_json(directory / name)
                                       for name in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, GENERATION_CONFIG))
        tokens: dict[str, str | None] = {}
        for source in (config, special):
            for role in ROLES:
                key = f"{role}_token"
                if role not in tokens and key in source:
                    tokens[role] = _token_text(source[key])
        generation_ids = {role: generation.get(f"{role}_token_id") for role in ("bos", "eos", "pad")}
        eos_ids = generation_ids["eos"] if isinstance(generation_ids["eos"], list) else [generation_ids["eos"]]
        generation_ids["eos"] = eos_ids[0] if eos_ids else None
        for role, index in generation_ids.items():
            if role not in tokens and isinstance(index, int):
                tokens[role] = id_to_token(index)
        end_of_turn = [t for t in (_token_list(config.get(END_OF_TURN_KEY)) + _eot_tokens(config)) if t]
        end_of_turn += [id_to_token(i) for i in eos_ids if isinstance(i, int)]
        eos = tokens.get("eos")
        end_of_turn = [t for t in dict.fromkeys(end_of_turn) if t is not None and t != eos]
        template_file = directory / CHAT_TEMPLATE_FILE
        template = (template_file.read_text(encoding="utf-8") if template_file.is_file()
                    else _template_text(config.get("chat_template")))
        return cls(**tokens, end_of_turn=tuple(end_of_turn), chat_template=template, declared=frozenset(tokens))

    def write(self, directory: str | Path, guessed: Mapping[str, str | None]) -> None:
        """``tokenizer_config.json`` and ``special_tokens_map.json`` as ``save_pretrained`` writes them (the chat
        template and the end-of-turn tokens in ``tokenizer_config.json``). ``guessed``: the tokens found by name
        for the roles the files did not state, written down so that the saved files state them."""
        directory = Path(directory)
        tokens = {role: (getattr(self, role) if self.says(role) else guessed.get(role)) for role in ROLES}
        stated = {f"{role}_token": token for role, token in tokens.items()
                  if self.says(role) or token is not None}
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **stated,
                                  "clean_up_tokenization_spaces": False}
        if self.end_of_turn:
            config[END_OF_TURN_KEY] = list(self.end_of_turn)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        _write_json(directory / TOKENIZER_CONFIG, config)
        _write_json(directory / SPECIAL_TOKENS_MAP, {k: v for k, v in stated.items() if v is not None})


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); restore it from the model's source") from None
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _token_text(value: Any) -> str | None:
    """A token as the files write it: a string, or an AddedToken dict ``{"content": ..., ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _token_list(value: Any) -> list[str | None]:
    return [_token_text(v) for v in value] if isinstance(value, list) else []


def _eot_tokens(config: dict[str, Any]) -> list[str | None]:
    """An ``eot_token`` stated at the top, or among transformers' extra special tokens."""
    found = [_token_text(config.get("eot_token"))]
    for key in ("extra_special_tokens", "model_specific_special_tokens"):
        extra = config.get(key)
        if isinstance(extra, dict):
            found.append(_token_text(extra.get("eot_token")))
    return found


def _walk(node: Any) -> Iterable[dict[str, Any]]:
    """A tokenizer.json component and the components of a Sequence inside it."""
    if isinstance(node, dict):
        yield node
        for child in node.get("pretokenizers") or []:
            yield from _walk(child)


def _template_text(value: Any) -> str | None:
    """``chat_template`` as a string, or a list of named templates: the one named "default", else the first."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default", next(iter(named.values()), None))
    return value if isinstance(value, str) else None


class Tokenizer:
    """encode(text) → ids, decode(ids) → text, ``vocab_size``, special tokens and their roles, ``save``/``load``."""

    def __init__(self, backend: _Backend, roles: TokenRoles | None = None):
        # User text never produces special ids: a typed "<|endoftext|>" or "<|im_end|>" is encoded as the
        # characters it is (else a user could forge a turn boundary). Only the model's own markup (a template,
        # BOS/EOS added by the post-processor, ``encode(..., markup=True)``) yields them.
        backend.encode_special_tokens = True
        self.backend = backend
        self.roles = roles if roles is not None else TokenRoles()
        self._markup_backend: _Backend | None = None
        self._continuation_backend: _Backend | None = None

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
        """Read a ``tokenizer.json`` (or a directory holding one), with the roles its neighbouring files state
        (``tokenizer_config.json``, ``special_tokens_map.json``, ``chat_template.jinja``,
        ``generation_config.json``)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}; expected a tokenizer.json")
        try:
            backend = _Backend.from_file(str(path))
        except Exception as err:  # the Rust side raises plain Exceptions
            raise ValueError(f"{path} is not a valid tokenizer.json: {err}") from None
        roles = TokenRoles.read(path.parent, backend.id_to_token) if path.name == "tokenizer.json" else None
        return cls(backend, roles)

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` (into ``path`` if it is a directory) and, beside a file of that name, the role
        files Hugging Face keeps there: ``tokenizer_config.json`` (the roles, the chat template and the
        end-of-turn tokens) and ``special_tokens_map.json``. :meth:`load` reads them back."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        self.backend.save(str(path))
        if path.name == "tokenizer.json":
            self.roles.write(path.parent, {role: self._guess(role) for role in ROLES if not self.roles.says(role)})

    def with_roles(self, roles: TokenRoles | None = None, **changes: Any) -> Tokenizer:
        """The same tokenizer with other roles: ``roles``, or this one's with ``changes`` (fields of TokenRoles)."""
        return Tokenizer(self.backend, replace(roles if roles is not None else self.roles, **changes))

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

    def _guess(self, role: str) -> str | None:
        """The first of the usual names for ``role`` that the vocabulary holds (files that say nothing)."""
        return next((name for name in _GUESSES[role] if self.backend.token_to_id(name) is not None), None)

    def _role_id(self, role: str) -> int | None:
        token = getattr(self.roles, role) if self.roles.says(role) else self._guess(role)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def pad_id(self) -> int | None:
        return self._role_id("pad")

    @property
    def bos_id(self) -> int | None:
        return self._role_id("bos")

    @property
    def eos_id(self) -> int | None:
        return self._role_id("eos")

    @property
    def unk_id(self) -> int | None:
        return self._role_id("unk")

    @property
    def mask_id(self) -> int | None:
        """The token masked-language modelling puts in place of a hidden token."""
        return self._role_id("mask")

    @property
    def stop_ids(self) -> list[int]:
        """The ids that end a reply: eos (SmolLM2's ``<|im_end|>``), then the stated end-of-turn tokens, each once."""
        ids = [self.eos_id, *(self.backend.token_to_id(t) for t in self.roles.end_of_turn)]
        return list(dict.fromkeys(i for i in ids if i is not None))

    @property
    def chat_template(self) -> str | None:
        """The model's Jinja chat template, as its files state it (None: the files have none)."""
        return self.roles.chat_template

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
        return self._encoding(text, add_special_tokens, markup).ids

    def encode_spans(self, text: str, *, continued: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        """As :meth:`encode` (special-token strings are text, nothing is added), with each token's (start, end)
        character span in ``text``: how a chat template's pieces are laid end to end. ``continued``: the text
        goes on from an earlier piece (after a special token), so it gets no word-start marker that a
        SentencePiece-style pre-tokenizer puts only at the start of a whole text (Metaspace
        ``prepend_scheme="first"``), as the tokenizer itself encodes the pieces between special tokens."""
        encoding = self._encoding(text, False, False, continued=continued)
        return encoding.ids, encoding.offsets

    def _encoding(self, text: str, add_special_tokens: bool, markup: bool, *, continued: bool = False):
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        check_unicode(text)
        backend = self._markup() if markup else (self._continuation() if continued else self.backend)
        try:
            encoding = backend.encode(text, add_special_tokens=add_special_tokens)
        except Exception as err:
            if "unk" in str(err).lower() or "missing" in str(err).lower():
                raise self._unknown(text) from None
            raise
        unk = self.unk_id
        if unk is not None and self.kind == "char" and unk in encoding.ids:
            raise self._unknown(text)
        return encoding

    def _continuation(self) -> _Backend:
        """The backend, or a twin whose Metaspace pre-tokenizer marks no word start at the text's start (built
        once): ``prepend_scheme`` "first" becomes "never"."""
        if self._continuation_backend is None:
            spec = json.loads(self.backend.to_str())
            found = [node for node in _walk(spec.get("pre_tokenizer"))
                     if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first"]
            for node in found:
                node["prepend_scheme"] = "never"
            self._continuation_backend = _Backend.from_str(json.dumps(spec)) if found else self.backend
            self._continuation_backend.encode_special_tokens = True
        return self._continuation_backend

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


def check_unicode(text: str) -> None:
    """Refuse text that is not Unicode: a lone surrogate (half of a UTF-16 pair, what Python makes of bytes that
    are not UTF-8 in a command-line argument) is a ``ValueError`` naming where it is, not the Rust tokenizer's
    ``TextInputSequence must be str``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"the text is not valid Unicode: character {err.start} is {text[err.start]!r}, a lone "
                         "surrogate (bytes that were not UTF-8 come out so); pass UTF-8 text") from None


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


class IncrementalText:
    """The text that tokens added one at a time make after ``context``: after each :meth:`add`, ``text`` equals
    ``decode_continuation(tokenizer, context, tokens so far)``, at a cost per token that does not grow with the
    length (decoding the whole continuation every step is quadratic in it).

    The text is kept up to the last *settled* token (one whose text did not end inside a character: byte-level
    BPE writes U+FFFD until a character's last byte arrives); each step decodes only the tokens since the token
    before it, the previous settled stretch standing in as the seam's context (as vLLM's incremental
    detokenizer does).
    """

    def __init__(self, tokenizer: Any, context: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self._ids = [int(i) for i in list(context)[-SEAM_CONTEXT:]]
        self._start = 0  # the first id decoded each step (the seam's context)
        self._settled = len(self._ids)  # ids before this one have their text in self._done
        self._done = ""
        self.text = ""

    def add(self, token: int) -> str:
        """Append one token id → the whole continuation's text so far (``text``)."""
        self._ids.append(int(token))
        # what the tokens since the last settled one add, read after the settled stretch before them (the seam)
        tail = decode_continuation(self.tokenizer, self._ids[self._start:self._settled], self._ids[self._settled:])
        self.text = self._done + tail
        if tail and not tail.endswith("\ufffd"):
            self._done = self.text
            self._start, self._settled = self._settled, len(self._ids)
        return self.text


def _chunks(text: str | Iterable[str], lines_per_chunk: int = 1000) -> Iterable[str]:
    """Feed a long text to the Rust trainer in pieces of ``lines_per_chunk`` lines."""
    if not isinstance(text, str):
        yield from text
        return
    lines = text.splitlines(keepends=True)
    for start in range(0, len(lines), lines_per_chunk):
        yield "".join(lines[start:start + lines_per_chunk])
