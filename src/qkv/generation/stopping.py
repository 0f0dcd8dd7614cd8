"""When a row stops: stop token ids and stop strings, in one place.

- A **stop token** (``stop_token_ids``; default the model's ``eos_token_id``, and for text the end-of-turn tokens
  its tokenizer's files state) ends a row after it is produced; it is kept in the ids and left out of the text.
- A **stop string** ends a row once its generated text contains it; the text is cut before it. Only the tail of
  the text that a new token can have changed is searched (the last ``len(longest stop string) - 1`` characters
  already searched, then the new ones), and the text is decoded after the prompt
  (:func:`~qkv.tokenizers.decode_continuation`), so a stop string across the seam is found as it will be printed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..config import ModelConfig
from ..tokenizers import IncrementalText
from .config import GenerationConfig

__all__ = ["stop_token_ids", "with_turn_ends", "until_stop_token", "find_stop", "open_stop", "StopStrings",
           "check_tokenizer"]


def stop_token_ids(cfg: GenerationConfig, config: ModelConfig) -> tuple[int, ...]:
    """The ids that end a row: ``cfg.stop_token_ids``, else the model's ``eos_token_id`` (``()``: never)."""
    stop = tuple(cfg.stop_token_ids) if cfg.stop_token_ids is not None else (
        () if config.eos_token_id is None else (config.eos_token_id,))
    for t in stop:
        if not 0 <= t < config.vocab_size:
            raise ValueError(f"stop token id {t} is outside [0, vocab_size={config.vocab_size}); pass ids of the "
                             "model's vocabulary")
    return stop


def with_turn_ends(cfg: GenerationConfig, eos_token_id: int | None, tokenizer: Any) -> GenerationConfig:
    """Text generation's stop tokens, unless the call names its own: the model's eos and the end-of-turn tokens
    the tokenizer's files state (LLaMA 3.1's ``<|eom_id|>`` and ``<|end_of_text|>`` beside its eos
    ``<|eot_id|>``), each once. A tokenizer that states none leaves the model's eos alone."""
    roles = getattr(tokenizer, "roles", None)
    if cfg.stop_token_ids is not None or roles is None or not roles.end_of_turn:
        return cfg
    ids = [eos_token_id, *tokenizer.stop_ids]
    return cfg.replace(stop_token_ids=tuple(dict.fromkeys(i for i in ids if i is not None)))


def check_tokenizer(cfg: GenerationConfig, tokenizer: Any) -> None:
    """Stop strings are read in the text: without a tokenizer they are an error (before the first token)."""
    if cfg.stop_strings and tokenizer is None:
        raise ValueError(f"stop_strings={cfg.stop_strings!r} need the tokenizer to read the text: pass "
                         "tokenizer=...")


def until_stop_token(tokens: list[int], stop: Sequence[int]) -> list[int]:
    """The generated tokens up to (not including) the first stop token."""
    for i, t in enumerate(tokens):
        if t in stop:
            return tokens[:i]
    return tokens


def find_stop(text: str, stop_strings: Sequence[str], start: int = 0) -> int:
    """The index in ``text`` where the earliest stop string begins (searching from ``start``), or -1."""
    found = [i for i in (text.find(s, start) for s in stop_strings) if i >= 0]
    return min(found) if found else -1


def open_stop(text: str, stop_strings: Sequence[str]) -> int:
    """How many trailing characters of ``text`` begin a stop string that the next characters may complete: the
    length of the longest suffix that is a proper prefix of one (0: every character is safe to print)."""
    longest = 0
    for s in stop_strings:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if s.startswith(text[-k:]):
                longest = k
                break
    return longest


class StopStrings:
    """The stop strings of a call, and each row's generated text as it grows (decoded incrementally).

    ``hold``: how many trailing characters may still turn out to begin a stop string (never printed early);
    ``find(text, searched)``: where a stop string begins in ``text`` given that its first ``searched`` characters
    were already searched (-1: none); ``hit(tokens, live)``: per row, did this step's token complete one?
    ``text(row)``: the row's text so far; ``cuts[row]``: where the first stop string found in it begins (-1: none
    yet), so that the text helpers cut there without decoding or searching again.
    """

    def __init__(self, strings: Sequence[str], tokenizer: Any = None, contexts: list[list[int]] | None = None):
        self.strings, self.tokenizer = tuple(strings), tokenizer
        self.hold = max((len(s) for s in self.strings), default=1) - 1
        self.texts = [IncrementalText(tokenizer, context) for context in contexts or []]
        self.searched = [0] * len(self.texts)  # characters of each row's text already searched
        self.cuts = [-1] * len(self.texts)

    def __bool__(self) -> bool:
        return bool(self.strings)

    def find(self, text: str, searched: int = 0) -> int:
        return find_stop(text, self.strings, max(0, searched - self.hold)) if self.strings else -1

    def text(self, row: int) -> str:
        """Row ``row``'s generated text so far, read after its prompt."""
        return self.texts[row].text

    def hit(self, tokens: list[int], live: list[bool]) -> list[bool]:
        found = [False] * len(tokens)
        for row, token in enumerate(tokens):
            if live[row]:
                text = self.texts[row].add(token)
                cut = self.find(text, self.searched[row])
                found[row] = cut >= 0
                if found[row] and self.cuts[row] < 0:
                    self.cuts[row] = cut
                self.searched[row] = len(text)
        return found
