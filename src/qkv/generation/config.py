"""Every knob of generation in one frozen dataclass, :class:`GenerationConfig`, and the rule that merges keyword
options into it (``generate(model, ids, 50, temperature=0)`` equals ``config=GenerationConfig(...)``)."""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any

from ..errors import OptionError

__all__ = ["GenerationConfig", "resolve"]


@dataclass(frozen=True)
class GenerationConfig:
    """How to choose each next token, and when to stop.

    - ``temperature``: 0 = greedy (argmax); otherwise sample from softmax(logits / temperature).
    - ``top_k``: sample only among the k most likely tokens (None = all).
    - ``top_p``: sample only from the nucleus, the smallest set of most likely tokens whose probability
      reaches top_p (1.0 = all).
    - ``repetition_penalty``: divide positive / multiply negative logits of tokens already present (CTRL);
      1.0 = off.
    - ``min_new_tokens`` / ``max_new_tokens``: stopping is impossible before the minimum; the maximum bounds it.
    - ``stop_token_ids``: a row stops after producing one of these (the token is kept in the ids). None means
      the model's ``eos_token_id`` if it has one; ``()`` means never.
    - ``stop_strings``: a row stops once its generated text contains one (needs ``tokenizer=``); the text
      functions cut the text before the stop string.
    - ``seed``: the same seed gives the same tokens (a private generator; the global RNG is not touched).
    - ``num_beams`` > 1: beam search, scoring log P(Y) / lp(Y) with lp(Y) = ((5 + |Y|) / 6)^length_penalty
      (GNMT; 0.6 as in "Attention Is All You Need"); ``early_stopping``: a row is done once it holds
      ``num_beams`` finished hypotheses (otherwise: once no live beam can still beat the worst finished one).
    - ``use_cache``: keep keys/values between steps (False recomputes the whole prefix each step: slow, for
      comparison; the same tokens within the context, but past it a RoPE, ALiBi or position-free model then
      re-encodes the window instead of rolling its cache, so the tokens differ).
    - ``sliding_window``: past the model's context (prompt + new tokens > max_seq_len) go on over a window of the
      last max_seq_len tokens (:mod:`qkv.decode_state`); False refuses with an error naming the numbers. None =
      the entry's own default: the text helpers (and ``qkv generate``) slide; ``generate``, ``stream`` and
      ``beam_search`` refuse, so token ids stay those of the model's exact forward pass unless asked.
    - ``bos_token_id``: the decoder's start token (encoder-decoder) and the prompt for an empty prompt;
      ``pad_token_id``: what fills rows that stopped early. None = the model's own.
    """

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] | None = None
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    num_beams: int = 1
    length_penalty: float = 0.6
    early_stopping: bool = True
    use_cache: bool = True
    sliding_window: bool | None = None
    bos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        def integer(name: str, low: int) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise OptionError(f"{{{name}}} must be an integer >= {low}", **{name: value})

        integer("max_new_tokens", 0)
        integer("min_new_tokens", 0)
        integer("num_beams", 1)
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not -2**63 <= self.seed < 2**64):  # what torch.Generator takes
            raise OptionError("{seed} must be an integer in [-2**63, 2**64), or {seed:None} for a fresh random "
                              "draw each time", seed=self.seed)
        if self.min_new_tokens > self.max_new_tokens:
            raise OptionError("{min_new_tokens} must be <= {max_new_tokens}", min_new_tokens=self.min_new_tokens,
                              max_new_tokens=self.max_new_tokens)
        if not 0 <= self.temperature < math.inf:  # also rejects NaN; inf would be uniform noise
            raise OptionError("{temperature} must be >= 0 and finite (0 = greedy, 1 = the model's own "
                              "distribution)", temperature=self.temperature)
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise OptionError("{top_k} must be an integer >= 1, or {top_k:None} to keep every token",
                              top_k=self.top_k)
        if not 0 < self.top_p <= 1:
            raise OptionError("{top_p} must lie in (0, 1]; 1 keeps every token", top_p=self.top_p)
        if not self.repetition_penalty > 0:
            raise OptionError("{repetition_penalty} must be > 0 (1 = off, > 1 discourages repeats)",
                              repetition_penalty=self.repetition_penalty)
        if not self.length_penalty >= 0:
            raise OptionError("{length_penalty} must be >= 0 (0 = none, 0.6 = GNMT)",
                              length_penalty=self.length_penalty)
        for name in ("stop_token_ids", "stop_strings"):  # accept lists, store tuples (the config is frozen)
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple([value] if isinstance(value, (int, str)) else value))
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise OptionError("{stop_strings} must be non-empty strings", stop_strings=self.stop_strings)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **changes: Any) -> GenerationConfig:
        """A copy with some fields changed (an unknown name is an error naming the closest field)."""
        known = [f.name for f in dataclasses.fields(self)]
        for key in changes:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known options: {', '.join(known)}"
                raise TypeError(f"unknown generation option {key!r}; {hint}")
        return dataclasses.replace(self, **changes)



def resolve(config: GenerationConfig | None, max_new_tokens: int | None, options: dict[str, Any]
            ) -> GenerationConfig:
    """The call's configuration: ``config`` (default: the defaults), with ``max_new_tokens`` and the keyword
    ``options`` applied on top (an unknown option is an error naming the closest field)."""
    config = GenerationConfig() if config is None else config
    if max_new_tokens is not None:
        options = {**options, "max_new_tokens": max_new_tokens}
    return config.replace(**options) if options else config
