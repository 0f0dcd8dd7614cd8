"""What one token of a conversation attended to, for the explorer's Chat panel: ``POST /api/chat/attention``.

``conversation_attention(explorer, {messages, token_index?})`` renders the conversation with the model's chat
template (``qkv.chat_template``, as ``/v1/chat/completions`` renders it; no generation prompt) and answers its
tokens: each token's text (``labels``, slices of the rendered text), the message it belongs to (``message``: an
index into ``messages``, or None) and whether the template wrote it (``markup``: the role headers,
``<|im_start|>``, ``<|im_end|>``, the plain format's ``User:``) or it is a message's own text. With
``token_index`` t it adds that one query's attention row in every layer and head, ``weights[layer][head][key]``
over the keys ``0..t`` (the ones a causal decoder lets it see; each row sums to 1), never a whole T×T map: the
tokens before t are fed once through a decode state on the fused path, without weights, then token t alone with
``return_attention=True``, so only its row is ever computed.
"""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import torch

from ..chat_template import ChatTemplate, ChatTemplateError, RenderedChat
from ..models import model_type_of, unwrap
from .explorer import Explorer, RequestError, _json_kind

__all__ = ["conversation_attention", "markup_flags", "ROLES"]

ROLES = ("system", "developer", "user", "assistant")
MAX_MESSAGES = 200


def _messages(payload: dict, max_chars: int) -> list[dict[str, str]]:
    messages = payload.get("messages")
    if not isinstance(messages, list):
        raise RequestError("messages must be a list of {\"role\", \"content\"} objects, got "
                           f"{_json_kind(messages)}")
    if not messages:
        raise RequestError("messages is empty; send the conversation (at least one message)")
    if len(messages) > MAX_MESSAGES:
        raise RequestError(f"messages holds {len(messages)} messages; the explorer takes at most {MAX_MESSAGES}",
                           HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    checked, total = [], 0
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise RequestError(f"messages[{i}] must be an object with role and content, got {_json_kind(message)}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or role not in ROLES:
            raise RequestError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {_json_kind(role)}")
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string (text in quotes), got {_json_kind(content)}")
        total += len(content)
        checked.append({"role": "system" if role == "developer" else role, "content": content})
    if total > max_chars * MAX_MESSAGES:
        raise RequestError(f"the conversation has {total} characters; the explorer takes at most "
                           f"{max_chars * MAX_MESSAGES}", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    return checked


def _token_index(payload: dict, n_tokens: int) -> int | None:
    index = payload.get("token_index")
    if index is None:
        return None
    if not isinstance(index, int) or isinstance(index, bool):
        raise RequestError(f"token_index must be an integer, got {_json_kind(index)}")
    if not 0 <= index < n_tokens:
        raise RequestError(f"token_index={index} is out of range; the conversation has {n_tokens} tokens "
                           f"(0 to {n_tokens - 1})")
    return index


def markup_flags(rendered: RenderedChat, messages: list[dict[str, str]], special_ids: set[int]
                 ) -> tuple[list[int | None], list[bool]]:
    """(message index or None, markup?) of every token. A token is a message's own text when it holds a character
    of that message's content where the template wrote it inside the message's range; everything else the
    template wrote (role headers, special tokens, separators, the generation prompt) is markup. A template whose
    renders do not extend each other has no ranges: there the special tokens alone are markup."""
    ids, starts, text = rendered.ids, rendered.starts, rendered.text
    n = len(ids)
    if rendered.ranges is None or len(starts) != n:
        return [None] * n, [i in special_ids for i in ids]
    ends = [*starts[1:], len(text)]
    message: list[int | None] = [None] * n
    markup = [True] * n
    for k, (first, last) in enumerate(rendered.ranges):
        if first >= last:
            continue
        low, high = starts[first], ends[last - 1]
        content = messages[k]["content"]
        where = text.find(content, low, high) if content else -1
        if where < 0 and content.strip():  # a template that trims the content
            content = content.strip()
            where = text.find(content, low, high)
        for i in range(first, last):
            message[i] = k
            if where >= 0 and ids[i] not in special_ids and starts[i] < where + len(content) and ends[i] > where:
                markup[i] = False
    return message, markup


def _labels(rendered: RenderedChat, tokenizer: Any) -> list[str]:
    """Each token's text: its slice of the rendered conversation, so that the labels joined are the text (a
    character split over byte tokens goes to the first of them), else each id decoded alone."""
    starts, text = rendered.starts, rendered.text
    if len(starts) != len(rendered.ids):
        return [tokenizer.decode([i], skip_special_tokens=False) for i in rendered.ids]
    return [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]


def conversation_attention(explorer: Explorer, payload: dict) -> dict:
    """The conversation's tokens with their message and markup flags; with ``token_index``, that query's attention
    row per layer and head (see the module's docstring)."""
    served = explorer.current()
    model, tokenizer = served.model, served.tokenizer
    if model_type_of(model) != "decoder":
        raise RequestError(f"a {model_type_of(model)} model does not chat; load a decoder (language model) "
                           "checkpoint", HTTPStatus.CONFLICT)
    messages = _messages(payload, explorer.max_text_chars)
    try:
        rendered = ChatTemplate(tokenizer).render(messages)
    except ChatTemplateError as err:
        raise RequestError(str(err)) from None
    ids = list(rendered.ids)
    limit = unwrap(model).config.max_seq_len
    if len(ids) > limit:
        raise RequestError(f"the conversation has {len(ids)} tokens, more than the model's context of {limit}; "
                           "start a new chat", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    index = _token_index(payload, len(ids))
    message, markup = markup_flags(rendered, messages, set(tokenizer.special_ids))
    answer: dict[str, Any] = {
        "labels": _labels(rendered, tokenizer),
        "message": message, "markup": markup, "roles": [m["role"] for m in messages],
        "token_index": index, "source": served.source,
    }
    if index is not None:
        with explorer.lock:  # one model computation at a time, the /v1 worker's included
            answer["weights"] = _query_row(model, ids[:index + 1])
    return answer


def _query_row(model: torch.nn.Module, ids: list[int]) -> list[list[list[float]]]:
    """The last token's attention over ``ids`` in every layer and head: (layers, heads, len(ids)), rounded."""
    device = next(unwrap(model).parameters()).device
    tokens = torch.tensor([ids], device=device)
    with torch.no_grad():
        state = unwrap(model).new_decode_state(1, len(ids))
        if len(ids) > 1:
            model(tokens[:, :-1], decode_state=state)  # the fused path: no weights for the earlier tokens
        _, weights = model(tokens[:, -1:], decode_state=state, return_attention=True)
    return [[[round(float(w), 6) for w in head[0]] for head in layer[0].float().cpu()] for layer in weights]
