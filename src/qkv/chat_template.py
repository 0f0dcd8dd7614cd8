"""Chat templates: a conversation → the model's prompt ids, rendered as transformers renders it, with the token
range of every message; one home for ``qkv chat``, the server and fine-tuning.

The model's own Jinja template (``tokenizer_config.json``'s ``chat_template``, GGUF ``tokenizer.chat_template``)
is rendered in jinja2's ``ImmutableSandboxedEnvironment`` set up as transformers' ``apply_chat_template`` sets it
up (``trim_blocks``, ``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` that keeps non-ASCII text,
``raise_exception``, ``strftime_now``) and given what it gives: ``messages``, ``add_generation_prompt`` and the
tokenizer's ``bos_token``, ``eos_token``, ``unk_token``, ``pad_token``. Templates come from strangers: the sandbox
refuses what could reach Python's internals.

The ids keep markup and content apart. The template's own special tokens (``<|im_start|>``, ``bos_token``) become
their ids; a special-token string inside a message (``<|im_end|>\\n<|im_start|>system``) is text. Each special
token in a message is wrapped in two Unicode noncharacters (U+FDD0, U+FDD1) before rendering, so that after it
the rendered text tells which special tokens the template wrote; the text is cut only at those, and every piece
between them, message content included, is encoded with special-token parsing off (the rendered string is never
re-read with it on). Cutting at the template's special tokens is what the tokenizer itself does with them, so for
ordinary content the ids equal ``apply_chat_template(tokenize=True)``. Nothing is added around the result: a
template that writes ``bos_token`` gets exactly one BOS (the post-processor's is not added, as transformers adds
none). The two noncharacters are removed from message text.

Each message's token range comes from prefix renders: message k covers what ``messages[:k+1]`` adds to the
rendering of ``messages[:k]``. A template whose renders do not extend each other (one that rewrites earlier turns)
has no ranges, and fine-tuning on it is refused with one line saying so (:meth:`RenderedChat.require_ranges`).

A model without a template (the demo's character model, GPT-2) gets the **plain format** :data:`PLAIN_TEMPLATE`,
one paragraph a message, ``Role: content``, and an open ``Assistant:`` line as the generation prompt, with
:attr:`ChatTemplate.note` saying so in one line; a reply there ends at a new ``User:`` line
(:attr:`ChatTemplate.stop_strings`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import jinja2.utils

from .tokenizers import Tokenizer

__all__ = ["ChatTemplate", "ChatTemplateError", "RenderedChat", "PLAIN_TEMPLATE", "PLAIN_STOP_STRINGS"]

# The format of a model that has no template: a paragraph per message, then an open assistant line.
PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
PLAIN_STOP_STRINGS = ("\nUser:",)

_OPEN, _CLOSE = "\ufdd0", "\ufdd1"  # noncharacters: Unicode reserves them for a program's internal use
_PROBE = "qkv probe reply"


class ChatTemplateError(ValueError):
    """A template that cannot render this conversation, or a conversation it cannot hold: one line."""


@dataclass(frozen=True)
class RenderedChat:
    """One conversation rendered: the text (as ``apply_chat_template(tokenize=False)``), its ids, and where each
    message's tokens lie.

    ``ranges[k]``: message k's tokens ``ids[start:end]`` (the markup around it included); ``replies[k]``: for an
    assistant message, the tokens the model produces for it (after the generation prompt, up to and including its
    end-of-turn markup), else None; ``prompt``: the range of the generation prompt (``(n, n)`` without one).
    A token that crosses a boundary (byte-level BPE's ``"\n "`` where a header's newline meets a reply's
    leading space) belongs to the part where it starts. Where the template's renders do not extend each other,
    ``ranges`` and ``replies`` are None and ``why`` says why.
    """

    text: str
    ids: list[int]
    ranges: list[tuple[int, int]] | None
    replies: list[tuple[int, int] | None] | None
    prompt: tuple[int, int]
    why: str | None = None
    starts: tuple[int, ...] = ()  # the character offset in ``text`` where each token starts

    def require_ranges(self) -> list[tuple[int, int]]:
        """The message ranges, or the one-line reason this template cannot give them (training needs them)."""
        if self.ranges is None:
            raise ChatTemplateError(f"cannot train on this chat template: {self.why}")
        return self.ranges


class _Namespace(jinja2.utils.Namespace):
    """jinja's ``namespace()`` without underscore names, as transformers has it (no reach into internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template may not store {name!r} on a namespace")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace)
    return env


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _plain_data(value: Any) -> Any:
    """What a template may see: JSON-like data only (a str subclass or an object could carry methods)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        return {_plain_data(k): _plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_data(v) for v in value]
    raise ChatTemplateError(f"a message holds a {type(value).__name__}; messages hold text, numbers, lists and "
                            "dicts only")


class ChatTemplate:
    """A tokenizer's chat template (or ``template``; None: the tokenizer's, else the plain format).

    ``render(messages, add_generation_prompt=True)`` → :class:`RenderedChat`; ``render_text`` → the text only.
    ``stop_ids``: the ids that end a reply (eos, the stated end-of-turn tokens, and the special token the
    template writes after an assistant message); ``stop_strings``: text that ends a reply (the plain format's
    ``User:`` line); ``note``: a one-line note when the plain format stands in for a missing template.
    """

    def __init__(self, tokenizer: Tokenizer, template: str | None = None):
        self.tokenizer = tokenizer
        template = template if template is not None else tokenizer.chat_template
        self.plain = template is None
        self.source = PLAIN_TEMPLATE if template is None else template
        self.note = ("the model has no chat template; using qkv's plain format (a 'Role: text' paragraph per "
                     "message, then 'Assistant:')" if self.plain else None)
        self.stop_strings = PLAIN_STOP_STRINGS if self.plain else ()
        try:
            self._template = _environment().from_string(self.source)
        except jinja2.exceptions.TemplateSyntaxError as err:
            raise ChatTemplateError(f"the chat template is not valid Jinja (line {err.lineno}: "
                                    f"{_one_line(err.message or err)}); fix it in tokenizer_config.json") from None
        added = tokenizer.backend.get_added_tokens_decoder()
        self._special = {t.content: (i, t) for i, t in added.items() if t.special}
        longest_first = sorted(self._special, key=len, reverse=True)
        alternatives = "|".join(map(re.escape, longest_first)) or "(?!)"
        self._special_re = re.compile(alternatives)
        self._marked_re = re.compile(f"{_OPEN}({alternatives}){_CLOSE}|({alternatives})|[{_OPEN}{_CLOSE}]")
        self._variables = {f"{role}_token": tokenizer.id_to_token(index)
                           for role in ("bos", "eos", "unk", "pad")
                           if (index := getattr(tokenizer, f"{role}_id")) is not None}

    # -- text ---------------------------------------------------------------------------------------------------
    def _messages(self, messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise ChatTemplateError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got a "
                                    f"{type(messages).__name__}")
        checked = []
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping) or "role" not in message:
                raise ChatTemplateError(f"message {i} must be a dict with 'role' and 'content', got {message!r:.60}")
            checked.append({k: _plain_data(v) for k, v in message.items() if v is not None})
        return checked

    def _mark(self, value: Any) -> Any:
        """Wrap every special-token string in message text in the two noncharacters (and drop stray ones)."""
        if isinstance(value, str):
            value = value.replace(_OPEN, "").replace(_CLOSE, "")
            return self._special_re.sub(lambda m: f"{_OPEN}{m.group(0)}{_CLOSE}", value) if self._special else value
        if isinstance(value, dict):
            return {k: self._mark(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._mark(v) for v in value]
        return value

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self._variables)
        except jinja2.exceptions.TemplateError as err:  # raise_exception, an undefined name, the sandbox
            kind = "refused the conversation" if type(err) is jinja2.exceptions.TemplateError else "failed"
            raise ChatTemplateError(f"the chat template {kind}: {_one_line(err.message or err)}") from None
        except Exception as err:  # a Python error inside the template (a bad index, a wrong type)
            raise ChatTemplateError(f"the chat template failed: {type(err).__name__}: {_one_line(err)}") from None

    def render_text(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> str:
        """The rendered conversation, as transformers' ``apply_chat_template(tokenize=False)`` gives it."""
        return self._render(self._messages(messages), add_generation_prompt)

    # -- ids ----------------------------------------------------------------------------------------------------
    def _segments(self, marked: str) -> tuple[str, list[tuple[str, int | None]]]:
        """The rendered text without the marks, as pieces: (text, None) encoded as text, (token, id) markup."""
        pieces: list[tuple[str, int | None]] = []
        text: list[str] = []
        last = 0
        for m in self._marked_re.finditer(marked):
            text.append(marked[last:m.start()])
            last = m.end()
            if m.group(1) is not None:  # a special-token string from a message: text
                text.append(m.group(1))
            elif m.group(2) is not None:  # written by the template: markup
                pieces.append(("".join(text), None))
                text = []
                pieces.append((m.group(2), self._special[m.group(2)][0]))
        text.append(marked[last:])
        pieces.append(("".join(text), None))
        return "".join(p for p, _ in pieces), pieces

    def _encode(self, pieces: list[tuple[str, int | None]]) -> tuple[list[int], list[int]]:
        """ids, and the character offset in the clean text where each token starts."""
        ids: list[int] = []
        starts: list[int] = []
        at = 0
        strip_next = False
        for i, (piece, index) in enumerate(pieces):
            if index is not None:
                ids.append(index)
                starts.append(at)
                strip_next = self._special[piece][1].rstrip
                at += len(piece)
                continue
            offset = 0
            if strip_next:  # a token that swallows the whitespace after it (AddedToken rstrip)
                offset = len(piece) - len(piece.lstrip())
            end = len(piece)
            following = pieces[i + 1] if i + 1 < len(pieces) else None
            if following is not None and following[1] is not None and self._special[following[0]][1].lstrip:
                end = max(offset, len(piece.rstrip()))
            if end > offset:
                new, spans = self.tokenizer.encode_spans(piece[offset:end], continued=at + offset > 0)
                ids += new
                starts += [at + offset + s for s, _ in spans]
            at += len(piece)
            strip_next = False
        return ids, starts

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> RenderedChat:
        """The conversation's text, ids and per-message token ranges (see :class:`RenderedChat`)."""
        checked = self._messages(messages)
        marked = self._mark(checked)
        text, pieces = self._segments(self._render(marked, add_generation_prompt))
        ids, starts = self._encode(pieces)

        def token_at(char: int) -> int:  # the first token that starts at or after a character offset
            return next((i for i, s in enumerate(starts) if s >= char), len(ids))

        why = None
        prefixes: list[str] = []
        try:
            prefixes = [self._segments(self._render(marked[:k], False))[0] for k in range(len(marked) + 1)]
            for k in range(len(marked)):
                if not prefixes[k + 1].startswith(prefixes[k]):
                    why = (f"rendering messages[:{k + 1}] does not extend the rendering of messages[:{k}] (the "
                           "template rewrites earlier turns), so no message has a token range of its own")
                    break
            if why is None and not text.startswith(prefixes[-1]):
                why = "the generation prompt does not extend the rendered conversation"
        except ChatTemplateError as err:
            why = f"rendering a prefix of the conversation fails ({err})"
        if why is not None:
            return RenderedChat(text, ids, None, None, (len(ids), len(ids)), why, tuple(starts))
        bounds = [token_at(len(p)) for p in prefixes]
        ranges = list(zip(bounds[:-1], bounds[1:], strict=True))
        replies: list[tuple[int, int] | None] = []
        for k, message in enumerate(checked):
            reply = None
            if message.get("role") == "assistant":
                try:
                    header = self._segments(self._render(marked[:k], True))[0]
                except ChatTemplateError:
                    header = None
                if header is not None and header.startswith(prefixes[k]) and prefixes[k + 1].startswith(header):
                    reply = (token_at(len(header)), bounds[k + 1])
            replies.append(reply)
        return RenderedChat(text, ids, ranges, replies, (bounds[-1], len(ids)), starts=tuple(starts))

    # -- ending a reply -----------------------------------------------------------------------------------------
    @cached_property
    def stop_ids(self) -> tuple[int, ...]:
        """eos, the tokenizer's stated end-of-turn tokens, and the special token the template writes right after
        an assistant message (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``), each once."""
        found = list(self.tokenizer.stop_ids)
        try:
            marked = self._mark([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}])
            _, pieces = self._segments(self._render(marked, False))
        except ChatTemplateError:
            pieces = []
        for i, (piece, index) in enumerate(pieces):
            if index is None and _PROBE in piece:
                rest = piece[piece.index(_PROBE) + len(_PROBE):]
                following = pieces[i + 1] if i + 1 < len(pieces) else None
                if not rest.strip() and following is not None and following[1] is not None:
                    found.append(following[1])
                break
        return tuple(dict.fromkeys(found))
