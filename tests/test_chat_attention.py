"""POST /api/chat/attention, the explorer's Chat panel's question: a conversation's tokens (the message each
belongs to, the template's markup marked) and, for one token, its attention row in every layer and head, never a
whole map. Spoken to over HTTP on a loopback uvicorn, as the page does, with the tiny ChatML model of the OpenAI
tests and a character model in the plain format.
"""

from __future__ import annotations

import pytest
import torch
from test_openai_api import CHAT, tiny_chat_model
from test_serve import KEY, request, running

from qkv import ModelConfig
from qkv.chat_template import ChatTemplate
from qkv.models import build_model
from qkv.serve import Explorer
from qkv.tokenizers import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

REPLY = " Paris is the capital of France."
CONVERSATION = [*CHAT, {"role": "assistant", "content": REPLY}]


@pytest.fixture(scope="module")
def served():
    model, tokenizer = tiny_chat_model()
    with running(Explorer(model, tokenizer)) as server:
        yield server, model, tokenizer


def test_a_token_gets_one_row_per_layer_and_head_equal_to_the_models_own(served):
    server, model, tokenizer = served
    ids = ChatTemplate(tokenizer).render(CONVERSATION).ids
    token = len(ids) - 4  # a reply token: the keys are the system and user turns and the reply before it
    status, answer = request(server, "POST", "/api/chat/attention", {"messages": CONVERSATION, "token_index": token})
    assert status == 200, answer
    weights = torch.tensor(answer["weights"])
    config = model.config
    assert weights.shape == (config.n_decoder_layers, config.n_heads, token + 1)  # layers x heads x keys: one row
    assert torch.allclose(weights.sum(-1), torch.ones(config.n_decoder_layers, config.n_heads), atol=1e-4)
    with torch.no_grad():
        _, maps = model(torch.tensor([ids[:token + 1]]), return_attention=True)
    assert torch.allclose(weights, torch.stack([m[0, :, -1] for m in maps]), atol=1e-5)
    assert answer["token_index"] == token and answer["source"] == "in-process model"
    assert len(answer["labels"]) == len(answer["message"]) == len(answer["markup"]) == len(ids)

    # without token_index: the tokens alone, nothing computed by the model
    status, tokens = request(server, "POST", "/api/chat/attention", {"messages": CONVERSATION})
    assert status == 200 and "weights" not in tokens and tokens["labels"] == answer["labels"]


def test_markup_is_what_the_template_wrote_and_content_each_messages_own_text(served):
    server, _, tokenizer = served
    status, answer = request(server, "POST", "/api/chat/attention", {"messages": CONVERSATION})
    assert status == 200
    labels, message, markup = answer["labels"], answer["message"], answer["markup"]
    assert "".join(labels) == ChatTemplate(tokenizer).render_text(CONVERSATION)
    assert answer["roles"] == ["system", "user", "assistant"]
    for k, m in enumerate(CONVERSATION):
        own = "".join(t for t, n, is_markup in zip(labels, message, markup, strict=True) if n == k and not is_markup)
        assert own == m["content"]
        around = "".join(t for t, n, is_markup in zip(labels, message, markup, strict=True) if n == k and is_markup)
        assert around == f"<|im_start|>{m['role']}\n<|im_end|>\n"  # the role header is markup, not only specials


def test_the_plain_format_marks_its_role_lines_as_markup():
    tokenizer = Tokenizer.char("the cat sat on a mat. User: Assistant:\n")
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset("tiny-decoder", vocab_size=tokenizer.vocab_size)).eval()
    chat = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": " sat on a mat"}]
    with running(Explorer(model, tokenizer)) as server:
        status, answer = request(server, "POST", "/api/chat/attention", {"messages": chat, "token_index": 12})
    assert status == 200, answer
    shown = "".join(f"[{t}]" if is_markup else t for t, is_markup in zip(answer["labels"], answer["markup"],
                                                                        strict=True))
    assert shown == "[U][s][e][r][:][ ]the cat[\n][\n][A][s][s][i][s][t][a][n][t][:][ ] sat on a mat[\n][\n]"
    assert torch.tensor(answer["weights"]).shape[-1] == 13


@pytest.mark.parametrize("body, message", [
    ({"messages": "hi"}, "messages must be a list"),
    ({"messages": []}, "messages is empty"),
    ({"messages": [5]}, "messages[0] must be an object"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role must be one of"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content must be a string"),
    ({"messages": CHAT, "token_index": "3"}, "token_index must be an integer"),
    ({"messages": CHAT, "token_index": True}, "token_index must be an integer"),
    ({"messages": CHAT, "token_index": 10_000}, "token_index=10000 is out of range"),
    ({"messages": CHAT, "token_index": -1}, "token_index=-1 is out of range"),
])
def test_wrong_fields_are_refused_in_one_line(served, body, message):
    server, *_ = served
    status, answer = request(server, "POST", "/api/chat/attention", body)
    assert status == 400 and message in answer["error"] and "\n" not in answer["error"], answer


def test_the_route_needs_the_token(served):
    server, *_ = served
    status, answer = request(server, "POST", "/api/chat/attention", {"messages": CHAT}, token="wrong")
    assert status == 401 and KEY not in str(answer)


def test_a_conversation_past_the_context_or_an_encoder_is_refused_in_one_line(served):
    server, _, tokenizer = served
    long = [{"role": "user", "content": "Paris cat dog mat story " * 120}]
    assert len(ChatTemplate(tokenizer).render(long).ids) > 512
    status, answer = request(server, "POST", "/api/chat/attention", {"messages": long, "token_index": 3})
    assert status == 413 and "more than the model's context of 512; start a new chat" in answer["error"]
    tokenizer = Tokenizer.char("the cat sat")
    encoder = build_model(ModelConfig.preset("tiny-encoder", vocab_size=tokenizer.vocab_size)).eval()
    with running(Explorer(encoder, tokenizer)) as other:
        status, answer = request(other, "POST", "/api/chat/attention", {"messages": CHAT})
    assert status == 409 and "encoder model does not chat" in answer["error"]
