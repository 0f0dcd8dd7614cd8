"""Chat data: JSONL conversations → the model's chat template → token ids with their targets → batches by length.

A chat file holds one conversation a line, ``{"messages": [{"role": ..., "content": ...}, ...]}`` (the format
of transformers' ``apply_chat_template`` and of OpenAI's fine-tuning files). Each conversation is rendered whole
with the model's own template (:class:`qkv.chat_template.ChatTemplate`), and its targets are the tokens of every
assistant reply, from the reply's first token up to and including its end-of-turn markup (``<|im_end|>``): the
ranges come from the template's prefix renders (``RenderedChat.replies``), never from searching the ids for a
header. Every other token (system, user, the assistant header) is context only.

A conversation longer than the context is cropped after the last assistant reply that fits (a turn boundary: the
crop is the render of the first turns, token for token), or skipped when not even its first reply fits; one with
no assistant reply has nothing to learn and is skipped too. :class:`ChatExamples` counts both.

:class:`ChatBatches` serves batches of conversations of similar length (right-padded; padding is no target), in
a plan that is a pure function of (seed, epoch), so batch ``i`` is the same whenever it is asked for: that is
what lets a run resume exactly.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from ..chat_template import ChatTemplate
from ..losses import IGNORE_INDEX
from .batches import PlannedBatches
from .padding import right_pad

__all__ = ["CHAT_SUFFIXES", "ChatCorpus", "read_chats", "is_chat_file", "ChatExample", "ChatExamples",
           "render_chats", "ChatBatch", "ChatBatches", "split_chats"]

CHAT_SUFFIXES = (".jsonl",)


@dataclass(frozen=True)
class ChatCorpus:
    """The conversations of a chat file and where they came from: its absolute path, size and sha256."""

    conversations: list[list[dict]]
    source: str
    sha256: str
    n_bytes: int


def is_chat_file(path: str | Path | None) -> bool:
    """A ``.jsonl`` file: chat data (one conversation a line), not plain text."""
    return path is not None and Path(path).suffix.lower() in CHAT_SUFFIXES


def _conversation(value, where: str) -> list[dict]:
    fix = 'each line must be {"messages": [{"role": "user", "content": "..."}, ...]}'
    if not isinstance(value, dict) or not isinstance(value.get("messages"), list) or not value["messages"]:
        raise ValueError(f"{where}: not a conversation; {fix}")
    messages = []
    for i, message in enumerate(value["messages"]):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: message {i} needs a string role and a string content; {fix}")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def read_chats(path: str | Path) -> ChatCorpus:
    """A chat JSONL file → :class:`ChatCorpus`; a line that is not a conversation is an error naming its number
    (blank lines are allowed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"chat file {path} does not exist; pass a JSONL file of "
                                '{"messages": [...]} lines')
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    conversations = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as err:
            raise ValueError(f"{path} line {number} is not JSON ({err.msg}); one conversation a line") from None
        conversations.append(_conversation(value, f"{path} line {number}"))
    if not conversations:
        raise ValueError(f"{path} holds no conversation; one {{\"messages\": [...]}} a line")
    return ChatCorpus(conversations, str(path.resolve()), hashlib.sha256(raw).hexdigest(), len(raw))


def split_chats(conversations: Sequence[list[dict]], val_fraction: float, seed: int
                ) -> tuple[list[list[dict]], list[list[dict]]]:
    """(train, validation): a seeded shuffle of the conversations, the last ``val_fraction`` (at least one)
    held out; a single conversation both trains and validates."""
    if len(conversations) < 2:
        return list(conversations), list(conversations)
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(order) * val_fraction))
    return [conversations[i] for i in order[:-n_val]], [conversations[i] for i in order[-n_val:]]


@dataclass(frozen=True)
class ChatExample:
    """One rendered conversation: its ids and, for each token, whether it is a target (an assistant reply's
    token, its end-of-turn markup included)."""

    ids: list[int]
    targets: list[bool]

    def labels(self) -> list[int]:
        """The next-token labels of ``ids[:-1]``: token t+1 where it is a target, else IGNORE_INDEX."""
        return [token if target else IGNORE_INDEX for token, target in zip(self.ids[1:], self.targets[1:],
                                                                            strict=True)]


@dataclass
class ChatExamples:
    """The conversations as examples, and what did not fit: ``cropped`` (cut after their last reply that fits
    ``max_len``), ``skipped_long`` (not even the first reply fits), ``skipped_no_reply`` (no assistant turn)."""

    examples: list[ChatExample] = field(default_factory=list)
    cropped: int = 0
    skipped_long: int = 0
    skipped_no_reply: int = 0

    def report(self, name: str, max_len: int) -> str:
        """One line: how many conversations of the ``name`` set are used, cropped and skipped."""
        parts = [f"{len(self.examples):,} {name} conversations"]
        if self.cropped:
            parts.append(f"{self.cropped:,} cropped after the last reply within {max_len} tokens")
        if self.skipped_long:
            parts.append(f"{self.skipped_long:,} skipped (the first reply ends past {max_len} tokens)")
        if self.skipped_no_reply:
            parts.append(f"{self.skipped_no_reply:,} skipped (no assistant reply)")
        return ", ".join(parts)


def render_chats(conversations: Sequence[list[dict]], template: ChatTemplate, max_len: int) -> ChatExamples:
    """Render every conversation whole with ``template``; targets from each assistant reply's token range;
    longer than ``max_len`` tokens → cropped at a turn boundary or skipped (see the module)."""
    out = ChatExamples()
    for messages in conversations:
        rendered = template.render(messages)
        rendered.require_ranges()  # a template that rewrites earlier turns has no reply ranges: one line
        replies = [r for r in rendered.replies if r is not None]
        if not replies:
            out.skipped_no_reply += 1
            continue
        ids = rendered.ids
        if len(ids) > max_len:
            fitting = [end for _, end in replies if end <= max_len]
            if not fitting:
                out.skipped_long += 1
                continue
            ids = ids[:fitting[-1]]
            replies = [(start, end) for start, end in replies if end <= len(ids)]
            out.cropped += 1
        targets = [False] * len(ids)
        for start, end in replies:
            targets[start:end] = [True] * (end - start)
        out.examples.append(ChatExample(list(ids), targets))
    return out


class ChatBatch(NamedTuple):
    """Conversations padded on the right: ``inputs`` (batch, T) the ids but the last, ``attention_mask`` (batch,
    T) True at real tokens, ``labels`` (batch, T) the next token where it is a target, else IGNORE_INDEX."""

    inputs: Tensor
    attention_mask: Tensor
    labels: Tensor

    def to(self, device: torch.device | str) -> ChatBatch:
        return ChatBatch(*(t.to(device, non_blocking=True) for t in self))


class ChatBatches(PlannedBatches):
    """Batches of ``batch_size`` conversations of similar length (see the module): ``batch(index)`` (a pure
    function of the index), ``fixed(n)`` (the first n batches of epoch 0, for validation), ``make(indices)``."""

    def __init__(self, examples: Sequence[ChatExample], batch_size: int, *, seed: int = 0, pad_id: int = 0,
                 name: str = "train"):
        if not examples:
            raise ValueError(f"the {name} set holds no conversation to learn from; give more conversations with "
                             "an assistant reply that fits the context")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.examples, self.batch_size, self.seed, self.pad_id, self.name = list(examples), batch_size, seed, \
            pad_id, name
        self._plan_first_epoch()

    def _plan(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(self.examples)))
        rng.shuffle(order)
        order.sort(key=lambda i: len(self.examples[i].ids))  # stable: equal lengths stay shuffled
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def make(self, indices: Sequence[int]) -> ChatBatch:
        """The batch of examples ``indices``, padded on the right."""
        chosen = [self.examples[i] for i in indices]
        inputs, mask = right_pad([e.ids[:-1] for e in chosen], self.pad_id)
        labels, _ = right_pad([e.labels() for e in chosen], IGNORE_INDEX)
        return ChatBatch(inputs, mask, labels)
