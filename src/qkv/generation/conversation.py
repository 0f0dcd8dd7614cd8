"""One conversation decoded with its KV cache kept between replies: :class:`Conversation`.

A chat resends the whole conversation every turn (the rendered messages, ending with the assistant header).
Recomputing it each time costs a forward pass over every earlier turn; instead the conversation keeps one decode
state (batch 1) and the ids it was fed, and each reply

1. finds the longest common token prefix of the new prompt and what the state holds (llama.cpp's server does the
   same with its prompt cache), rewinds the state to it (:meth:`~qkv.decode_state.DecodeState.rewind`) and feeds
   only the rest, at least one token, since the next token needs fresh logits;
2. starts a fresh state instead when the old one slid its window past the context (its first tokens are gone);
3. chooses each token as :func:`~qkv.generation.generate` does (:func:`~qkv.generation.logits.process`, then
   :func:`~qkv.generation.logits.choose`: temperature 0 is the argmax, top-k, top-p, a per-request generator);
4. decodes the text incrementally after the prompt (:class:`~qkv.tokenizers.IncrementalText`) and yields one
   :class:`ReplyPiece` per token, holding back a character that is still incomplete (a multi-byte character split
   over byte tokens, decoded as U+FFFD until its last byte arrives) and the end of the text while it may still
   begin a stop string; the stop string itself never appears.

After a reply the state holds the prompt and every reply token but the last (which no step fed); the next turn's
prompt repeats them, so it feeds only what is new. Nothing runs before the first piece is asked for, and closing
the iterator (a client that went away) stops the generation: the state keeps what was fed.

    conversation = Conversation(model, tokenizer)
    rendered = ChatTemplate(tokenizer).render(messages, add_generation_prompt=True)
    for piece in conversation.reply(rendered.ids, GenerationConfig(max_new_tokens=200, temperature=0)):
        print(piece.text, end="")
    piece.finish_reason, piece.prompt_tokens, piece.reused_tokens   # "stop", 57, 41
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..chat_template import ChatTemplate
from ..decode_state import DecodeState
from ..models import model_type_of, unwrap
from ..tokenizers import IncrementalText
from .compiled import eager_module, is_compiled, state_capacity
from .config import GenerationConfig
from .logits import choose_checked, read_checked, seen_tokens
from .prompt import evaluating
from .stopping import StopStrings, open_stop, stop_token_ids

__all__ = ["Conversation", "ReplyPiece", "PromptTooLong", "fit_messages"]


class PromptTooLong(ValueError):
    """The prompt does not fit the conversation's context: ``tokens`` tokens, ``limit`` positions (one line)."""

    def __init__(self, tokens: int, limit: int):
        self.tokens, self.limit = tokens, limit
        super().__init__(f"the conversation is {tokens} tokens long but the context holds {limit}; drop its oldest "
                         "turns or shorten the messages")


@dataclass(frozen=True)
class ReplyPiece:
    """What one reply token adds: ``token_id`` (None only for a reply of no tokens), ``text`` (the part of the
    reply's text now certain; may be empty). The last piece of a reply has ``finish_reason`` "stop" (a stop token,
    kept as its token_id, or a stop string) or "length" (``max_new_tokens``, or the context is full) and the
    counts: ``prompt_tokens``, ``completion_tokens`` (every token generated, a stop token included),
    ``reused_tokens`` (the prompt's tokens whose keys and values came from the cache; the rest were fed)."""

    token_id: int | None
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reused_tokens: int = 0


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Conversation:
    """One sequence (batch 1) of a decoder-only model, its decode state kept between :meth:`reply` calls.

    ``max_len``: the most tokens the conversation may hold (prompt + reply), default and at most the model's
    ``max_seq_len``. ``template``: the :class:`~qkv.chat_template.ChatTemplate` of ``tokenizer``, whose stops end a
    reply by default. One reply runs at a time: starting a new one ends the iterator of the previous one.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, max_len: int | None = None):
        core = unwrap(model)
        if model_type_of(model) != "decoder":
            raise TypeError(f"a conversation needs a decoder-only qkv model (DecoderLM), got {type(core).__name__}")
        limit = core.config.max_seq_len
        if max_len is not None and (not isinstance(max_len, int) or max_len < 1):
            raise ValueError(f"max_len={max_len!r} must be a positive integer")
        self.model, self.core, self.tokenizer = model, core, tokenizer
        self.context = limit if max_len is None else min(max_len, limit)
        self.template = ChatTemplate(tokenizer)
        self.state: DecodeState | None = None
        self.cached: list[int] = []  # the ids the state was fed, in order
        self._turn = 0

    def reset(self) -> None:
        """Forget everything: the next reply feeds its whole prompt."""
        self.state, self.cached = None, []
        self._turn += 1

    def _stops(self, cfg: GenerationConfig, stop_strings: Sequence[str], stop_token_ids: Sequence[int] | None
               ) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """The call's stop ids (the argument, else the config's, else the template's with its stop strings)."""
        strings = [*cfg.stop_strings, *stop_strings]
        if stop_token_ids is None and cfg.stop_token_ids is None:
            ids = tuple(dict.fromkeys(i for i in (self.core.config.eos_token_id, *self.template.stop_ids)
                                      if i is not None))
            strings += self.template.stop_strings
        else:
            ids = tuple(stop_token_ids if stop_token_ids is not None else cfg.stop_token_ids)
        ids = stop_token_ids_checked(ids, cfg, self.core)
        if any(not isinstance(s, str) or not s for s in strings):
            raise ValueError(f"stop strings must be non-empty strings, got {strings!r}")
        return ids, tuple(dict.fromkeys(strings))

    def reply(self, ids: Sequence[int], config: GenerationConfig, *, generator: torch.Generator | None = None,
              stop_strings: Sequence[str] = (), stop_token_ids: Sequence[int] | None = None) -> Iterator[ReplyPiece]:
        """Continue the conversation ``ids`` (all of it, ending with the assistant header) → its reply, a piece
        per token (see :class:`ReplyPiece`).

        ``config``: sampling as in :class:`~qkv.generation.GenerationConfig` (temperature 0 = greedy; beams do
        not apply); its seed gives a generator unless ``generator`` is given (a per-request one: the same seed,
        the same text). ``stop_token_ids`` default to the config's, else the chat template's stop ids (eos, the
        end-of-turn tokens), with the plain format's stop strings; ``stop_strings`` are added to the config's.
        ``config.sliding_window=True`` goes on past the context (the next reply then starts a fresh state);
        otherwise a reply ends with "length" when the context is full. The prompt is checked here: longer than
        the context is :class:`PromptTooLong`.
        """
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("the prompt is empty; render the conversation with add_generation_prompt=True")
        vocab = self.core.config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"the prompt holds token ids outside [0, vocab_size={vocab}): min {min(ids)}, max "
                             f"{max(ids)}; encode it with the model's own tokenizer")
        if len(ids) > self.context:
            raise PromptTooLong(len(ids), self.context)
        if config.num_beams > 1:
            raise ValueError(f"num_beams={config.num_beams}: a conversation streams its reply, which beam search "
                             "cannot; use num_beams=1")
        stop, strings = self._stops(config, stop_strings, stop_token_ids)
        if generator is None and config.seed is not None:
            generator = torch.Generator(self._device()).manual_seed(config.seed)
        self._turn += 1
        return self._reply(ids, config, generator, stop, strings, self._turn)

    def _device(self) -> torch.device:
        first = next(self.core.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    def _reuse(self, ids: list[int], cfg: GenerationConfig) -> int:
        """Rewind the state to the longest prefix it shares with ``ids`` (leaving one token to feed) → its length;
        0 with a fresh state when the old one cannot rewind, or (compiled) holds too few slots for this reply."""
        state = self.state
        reused = min(_common_prefix(self.cached, ids), len(ids) - 1)
        capacity = self.context  # eagerly a step reads the slots filled so far: room costs nothing
        if is_compiled(self.model) and not cfg.sliding_window:  # a graph reads them all: the bucket that fits
            capacity = state_capacity(len(ids) + cfg.max_new_tokens, self.context, compiled=True)
        if state is not None:
            state.sync()
            if state.restarted or state.fed > state.length or state.fed != len(self.cached):
                state = None  # the window slid past the context: the first tokens are gone
            elif state.capacity < capacity:
                state = None  # a compiled model's bucket too small for this reply: a larger one, fed afresh
        if state is None:
            state = self.core.new_decode_state(1, capacity, sliding_window=True)
            self.cached, reused = [], 0
        state.rewind(reused)
        self.state, self.cached = state, self.cached[:reused]
        return reused

    def _feed(self, ids: list[int]) -> torch.Tensor:
        """Feed ``ids`` to the state → the next-token logits (1, vocab)."""
        tensor = torch.tensor([ids], dtype=torch.long, device=self._device())
        if len(ids) == 1:  # a step: through the compiled graph when there is one (the call generate's steps make)
            logits = self.model(tensor, decode_state=self.state)[:, -1]
        else:  # a prompt: eagerly, the output layer on its last position only
            logits = eager_module(self.model)(tensor, decode_state=self.state, logits_to_keep=1)[:, -1]
        self.cached += ids
        return logits  # checked where the token is read (one read a step)

    @torch.inference_mode()  # entered at each step of the iterator and left at each yield
    def _reply(self, ids: list[int], cfg: GenerationConfig, generator: torch.Generator | None,
               stop: tuple[int, ...], strings: tuple[str, ...], turn: int) -> Iterator[ReplyPiece]:
        with evaluating(self.model):
            reused = self._reuse(ids, cfg)
            logits = self._feed(ids[reused:])
            n_new = cfg.max_new_tokens
            if not (cfg.sliding_window and self.context >= self.core.config.max_seq_len):
                n_new = min(n_new, self.state.capacity - len(ids) + 1)  # the last token is never fed
            counts = {"prompt_tokens": len(ids), "reused_tokens": reused}
            if n_new <= 0:
                yield ReplyPiece(None, "", "length", completion_tokens=0, **counts)
                return
            device = logits.device
            stop_tensor = torch.tensor(stop, dtype=torch.long, device=device) if stop else None
            seen = None
            if cfg.repetition_penalty != 1.0:
                seen = seen_tokens(torch.tensor([ids], device=device), None, self.core.config.vocab_size)
            finder = StopStrings(strings)
            decoded, generated = IncrementalText(self.tokenizer, ids), []
            text, emitted, searched = "", 0, 0
            for step in range(n_new):
                chosen = choose_checked(logits, step, cfg, seen, stop_tensor, generator)
                (token,) = read_checked(chosen, logits)  # the step's one read, the NaN/inf test with it
                generated.append(token)
                finish = None
                if token in stop and step >= cfg.min_new_tokens:
                    finish = "stop"
                else:
                    text = decoded.add(token)
                    cut = finder.find(text, searched)
                    searched = len(text)
                    if cut >= 0 and step >= cfg.min_new_tokens:
                        text, finish = text[:cut], "stop"
                if finish is None and step + 1 == n_new:
                    finish = "length"
                if finish is not None:
                    rest = text[emitted:].rstrip("\ufffd")  # a character whose last bytes never came
                    yield ReplyPiece(token, rest, finish, completion_tokens=len(generated), **counts)
                    return
                held = max(open_stop(text, strings), len(text) - len(text.rstrip("\ufffd")))
                safe = max(emitted, len(text) - held)
                yield ReplyPiece(token, text[emitted:safe])
                emitted = safe
                if self._turn != turn:
                    raise RuntimeError("a newer reply started on this conversation; this one cannot go on")
                if seen is not None:
                    seen[0, token] = True
                logits = self._feed([token])


def fit_messages(template: ChatTemplate, messages: Sequence[dict[str, Any]], limit: int
                 ) -> tuple[list[int], list[dict[str, Any]], int]:
    """Render ``messages`` with the generation prompt, dropping the oldest turns until the ids are at most ``limit``
    long → (ids, the messages kept, how many turns were dropped).

    A turn is a user message and the replies after it; system messages stay, and so does the last turn (the
    message being answered), so the ids may still exceed ``limit`` when that alone does not fit."""
    kept = list(messages)
    dropped = 0
    while True:
        ids = template.render(kept, add_generation_prompt=True).ids
        turns = [i for i, m in enumerate(kept) if m.get("role") != "system"]
        if len(ids) <= limit or len(turns) < 2:
            return ids, kept, dropped
        first = turns[0]
        end = next((i for i in turns[1:] if kept[i].get("role") == "user"), turns[-1])
        kept = kept[:first] + kept[end:]
        dropped += 1


def stop_token_ids_checked(ids: tuple[int, ...], cfg: GenerationConfig, core: nn.Module) -> tuple[int, ...]:
    """``ids``, each checked to lie in the model's vocabulary (one line naming the id otherwise)."""
    return stop_token_ids(cfg.replace(stop_token_ids=ids), core.config)
