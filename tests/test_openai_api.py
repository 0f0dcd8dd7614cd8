"""The OpenAI-compatible routes of qkv serve, spoken to by the official ``openai`` client (and raw HTTP where the
client would hide the bytes) against a real uvicorn on a free loopback port: a tiny decoder whose byte-level BPE
tokenizer has a ChatML chat template.

The tiny model never ends its turn by itself (its end-of-turn rows of the output layer are zero, so a greedy reply
runs to max_tokens): how long a generation holds the worker is then set by the request, which the queue tests use.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from contextlib import closing

import openai
import pytest
import torch
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as Backend

from qkv import ModelConfig
from qkv.chat_template import ChatTemplate
from qkv.generation import generate
from qkv.models import build_model
from qkv.serve import Explorer, make_server
from qkv.tokenizers import Tokenizer, TokenRoles, decode_continuation

pytestmark = pytest.mark.usefixtures("one_thread")

KEY = "test-key-0123456789"
ORIGIN = "http://localhost:3000"
MAX_NEW = 480  # the server's --max-new-tokens
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ("You are a helpful assistant. What is the capital of France? Paris is the capital of France. "
          "Tell me a story about a cat who sat on a mat. Thanks! The dog ran after the cat.\n") * 3
CHAT = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Tell me a story about a cat."}]


def tiny_chat_model():
    """A tiny decoder and a ChatML byte-level BPE tokenizer (SmolLM2's roles: bos <|im_start|>, eos <|im_end|>)."""
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([CORPUS], trainer=trainer)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tokenizer = Tokenizer(backend, TokenRoles.of(bos="<|im_start|>", eos="<|im_end|>", chat_template=CHATML))
    torch.manual_seed(0)
    config = ModelConfig.preset("tiny-decoder", vocab_size=tokenizer.vocab_size, max_seq_len=512,
                                tie_embeddings=False)
    model = build_model(config).eval()
    with torch.no_grad():
        for token in SPECIALS:  # logit 0 among random ones: greedy never ends the turn
            model.lm_head.weight[tokenizer.token_to_id(token)] = 0
    return model, tokenizer


@pytest.fixture(scope="module")
def served():
    model, tokenizer = tiny_chat_model()
    explorer = Explorer(model, tokenizer, max_new_tokens=MAX_NEW)
    with make_server(explorer, api_key=KEY, queue_size=1, allowed_origins=[ORIGIN]) as server:
        yield server, model, tokenizer


def client(server, key: str = KEY, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api_base, api_key=key, **{"max_retries": 0, "timeout": 60, **kwargs})


def name_of(server) -> str:
    return client(server).models.list().data[0].id


def raw(server, method: str, path: str, body=None, *, key: str | None = KEY, headers: dict | None = None
        ) -> tuple[int, dict | bytes, http.client.HTTPMessage]:
    """(status, JSON or bytes, headers) of one request on its own connection."""
    conn = http.client.HTTPConnection(*server.server_address, timeout=60)
    head = {"Content-Type": "application/json"} if body is not None else {}
    if key is not None:
        head["Authorization"] = f"Bearer {key}"
    head.update(headers or {})
    conn.request(method, path, body=None if body is None else json.dumps(body).encode(), headers=head)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    is_json = response.getheader("Content-Type", "").startswith("application/json")
    return response.status, json.loads(data) if is_json else data, response.msg


def greedy(model, tokenizer, messages, n: int) -> tuple[list[int], list[int], str]:
    """(prompt ids, reply ids, reply text) of the library's greedy decoding of the rendered conversation."""
    template = ChatTemplate(tokenizer)
    ids = template.render(messages, add_generation_prompt=True).ids
    out = generate(model, torch.tensor([ids]), n, temperature=0, stop_token_ids=template.stop_ids)
    new = out[0, len(ids):].tolist()
    return ids, new, decode_continuation(tokenizer, ids, new)


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def worker(server):
    return server.app.state.openai.worker


def hold(server, max_tokens: int = 400):
    """A streamed greedy generation of ``max_tokens`` that has started (its first piece read): the worker is busy."""
    stream = client(server).chat.completions.create(model=name_of(server), messages=CHAT, temperature=0,
                                                   max_tokens=max_tokens, stream=True)
    next(iter(stream))
    wait_for(lambda: worker(server).status()["generating"])
    return stream


# -- answers --------------------------------------------------------------------------------------------------------
def test_models_lists_the_served_model_and_health_needs_no_key(served):
    server, *_ = served
    listed = client(server).models.list()
    assert [m.id for m in listed.data] == ["in-process-model"] and listed.data[0].owned_by == "qkv"
    assert client(server).models.retrieve("in-process-model").id == "in-process-model"
    status, body, _ = raw(server, "GET", "/health", key=None)
    assert status == 200 and body["status"] == "ok" and body["queue_size"] == 1
    assert raw(server, "GET", "/v1/models", key=None)[0] == 401


def test_temperature_0_is_the_greedy_continuation_of_the_rendered_prompt(served):
    """Temperature 0 is honoured (no `x or default`): the reply is qkv generate --greedy on the same prompt ids."""
    server, model, tokenizer = served
    ids, new, text = greedy(model, tokenizer, CHAT, 12)
    reply = client(server).chat.completions.create(model=name_of(server), messages=CHAT, temperature=0,
                                                  max_tokens=12)
    assert isinstance(reply, ChatCompletion) and reply.object == "chat.completion"
    assert reply.choices[0].message.content == text and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), 12)
    assert reply.usage.total_tokens == len(ids) + 12


def test_streamed_chunks_validate_and_join_to_the_text_answered_at_once(served):
    server, *_ = served
    asked = dict(model=name_of(server), messages=CHAT, temperature=0, max_tokens=20)
    whole = client(server).chat.completions.create(**asked)
    chunks = list(client(server).chat.completions.create(**asked, stream=True))
    assert all(isinstance(c, ChatCompletionChunk) and c.usage is None for c in chunks)  # no usage unless asked
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert chunks[0].choices[0].delta.role == "assistant" and len({c.id for c in chunks}) == 1

    # the bytes: `data: {json}\n\n` events that the client's own models accept, ending `data: [DONE]`
    conn = http.client.HTTPConnection(*server.server_address, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps({**asked, "stream": True, "stream_options":
                                                               {"include_usage": True}}),
                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.getheader("Content-Type").startswith("text/event-stream")
    body = response.read().decode()
    conn.close()
    events = body.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: ") for e in events[:-1])
    parsed = [ChatCompletionChunk.model_validate(json.loads(e[6:])) for e in events[:-2]]
    assert parsed[-1].choices == [] and parsed[-1].usage == whole.usage  # one extra chunk, the same counts
    assert all(c.usage is None for c in parsed[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in parsed[:-1]) == whole.choices[0].message.content


def test_a_stop_string_spanning_two_tokens_ends_the_reply_before_it(served):
    server, model, tokenizer = served
    ids, new, text = greedy(model, tokenizer, CHAT, 30)
    two = decode_continuation(tokenizer, ids, new[:6])[len(decode_continuation(tokenizer, ids, new[:4])):]
    assert two and len(tokenizer.encode(two)) >= 1
    expected = text[:text.index(two)]
    asked = dict(model=name_of(server), messages=CHAT, temperature=0, max_tokens=30, stop=[two, "never here"])
    reply = client(server).chat.completions.create(**asked)
    assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
    chunks = list(client(server).chat.completions.create(**asked, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected  # no prefix of it leaks
    assert chunks[-1].choices[0].finish_reason == "stop"
    single = client(server).chat.completions.create(**{**asked, "stop": two})  # a string as well as a list
    assert single.choices[0].message.content == expected


def test_the_same_seed_gives_the_same_text_whatever_ran_between(served):
    server, *_ = served
    c, name = client(server), name_of(server)

    def sample(seed: int) -> str:
        return c.chat.completions.create(model=name, messages=CHAT, temperature=1.0, top_p=0.95, seed=seed,
                                         max_tokens=16).choices[0].message.content

    first = sample(7)
    c.chat.completions.create(model=name, messages=CHAT[:1] + [{"role": "user", "content": "Thanks!"}],
                              temperature=1.0, max_tokens=16)  # draws from its own generator, unseeded
    assert sample(7) == first
    assert sample(8) != first


def test_max_tokens_bounds_the_reply_with_finish_reason_length(served):
    server, *_ = served
    c, name = client(server), name_of(server)
    for key in ("max_tokens", "max_completion_tokens"):
        # greedy: this model's end-of-turn logits are zeroed, so only a draw could end the reply early
        reply = c.chat.completions.create(model=name, messages=CHAT, temperature=0, **{key: 3})
        assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3


def test_text_completions_continue_a_prompt(served):
    server, model, tokenizer = served
    prompt = "The dog ran after"
    ids = tokenizer.encode(prompt, add_special_tokens=True)
    out = generate(model, torch.tensor([ids]), 8, temperature=0, stop_token_ids=())
    expected = decode_continuation(tokenizer, ids, out[0, len(ids):].tolist())
    c, name = client(server), name_of(server)
    reply = c.completions.create(model=name, prompt=prompt, temperature=0, max_tokens=8)
    assert isinstance(reply, Completion) and reply.choices[0].text == expected
    assert reply.choices[0].finish_reason == "length" and reply.usage.prompt_tokens == len(ids)
    chunks = list(c.completions.create(model=name, prompt=prompt, temperature=0, max_tokens=8, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks[:-1]) == expected and chunks[-1].choices == []
    assert c.completions.create(model=name, prompt=ids, temperature=0, max_tokens=8).choices[0].text == expected
    # OpenAI's default max_tokens, 16 (greedy, as a draw could end on the zeroed end-of-turn token)
    assert c.completions.create(model=name, prompt=prompt, temperature=0).usage.completion_tokens == 16


def test_a_request_extending_the_conversation_feeds_only_its_new_tokens(served):
    """OpenAI clients resend the whole history: the server reuses the longest common token prefix with the cache
    (llama.cpp's prompt cache), and the reply equals that of a fresh server, which computes everything."""
    server, model, tokenizer = served
    c, name = client(server), name_of(server)
    first = c.chat.completions.create(model=name, messages=CHAT, temperature=0, max_tokens=10)
    reply = first.choices[0].message.content
    longer = [*CHAT, {"role": "assistant", "content": reply}, {"role": "user", "content": "Thanks! And the dog?"}]
    second = c.chat.completions.create(model=name, messages=longer, temperature=0, max_tokens=10)

    template = ChatTemplate(tokenizer)
    ids1, ids2 = (template.render(m, add_generation_prompt=True).ids for m in (CHAT, longer))
    _, fed_reply, _ = greedy(model, tokenizer, CHAT, 10)
    held = ids1 + fed_reply[:-1]  # the cache: the prompt and every reply token but the last
    shared = next((i for i, (a, b) in enumerate(zip(held, ids2, strict=False)) if a != b), min(len(held), len(ids2)))
    assert shared >= len(ids1)  # at least the whole first prompt
    assert second.usage.prompt_tokens == len(ids2)
    assert second.usage.prompt_tokens_details.cached_tokens == shared  # fed: len(ids2) - shared new tokens

    with make_server(Explorer(model, tokenizer, max_new_tokens=MAX_NEW), api_key=KEY) as fresh:
        again = client(fresh).chat.completions.create(model=name, messages=longer, temperature=0, max_tokens=10)
    assert again.usage.prompt_tokens_details.cached_tokens == 0
    assert again.choices[0].message.content == second.choices[0].message.content


# -- errors ---------------------------------------------------------------------------------------------------------
def test_a_wrong_or_missing_key_is_an_authentication_error(served):
    server, *_ = served
    with pytest.raises(openai.AuthenticationError) as caught:
        client(server, key="wrong").chat.completions.create(model=name_of(server), messages=CHAT)
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    status, body, headers = raw(server, "POST", "/v1/chat/completions", {"model": "x", "messages": CHAT}, key=None)
    assert status == 401 and set(body["error"]) == {"message", "type", "param", "code"}
    assert headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize(("change", "status", "param", "code"), [
    ({"n": 2}, 400, "n", "unsupported_parameter"),
    ({"logprobs": True}, 400, "logprobs", "unsupported_parameter"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", "unsupported_parameter"),
    ({"frequency_penalty": 0.5}, 400, "frequency_penalty", "unsupported_parameter"),
    ({"best_guess": 1}, 400, "best_guess", "unknown_parameter"),
    ({"temperature": 2.5}, 400, "temperature", "invalid_value"),
    ({"temperature": "0"}, 400, "temperature", "invalid_value"),
    ({"top_p": 1.5}, 400, "top_p", "invalid_value"),
    ({"seed": 10**23}, 400, "seed", "invalid_value"),
    ({"max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ({"max_tokens": MAX_NEW + 1}, 400, "max_tokens", "invalid_value"),
    ({"max_completion_tokens": MAX_NEW + 1}, 400, "max_completion_tokens", "invalid_value"),
    ({"stop": ""}, 400, "stop", "invalid_value"),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options", "invalid_value"),
    ({"messages": "hello"}, 400, "messages", "invalid_value"),
    ({"messages": []}, 400, "messages", "invalid_value"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", "invalid_value"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages[0].content[0]", "unsupported_parameter"),
    ({"messages": [{"role": "tool", "content": "4", "tool_call_id": "1"}]}, 400, "messages[0].role",
     "unsupported_parameter"),
    ({"model": None}, 400, "model", "missing_required_parameter"),
    ({"model": "gpt-4o"}, 404, "model", "model_not_found"),
    ({"messages": [{"role": "user", "content": "cat " * 600}]}, 400, "messages", "context_length_exceeded"),
    ({"messages": [{"role": "user", "content": "cat " * 100}], "max_tokens": 470}, 400, "messages",
     "context_length_exceeded"),
])
def test_errors_come_in_openais_shape_naming_the_parameter(served, change, status, param, code):
    server, *_ = served
    body = {"model": name_of(server), "messages": CHAT, **change}
    body = {k: v for k, v in body.items() if v is not None}
    got, answer, _ = raw(server, "POST", "/v1/chat/completions", body)
    assert got == status, answer
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}
    assert (answer["error"]["param"], answer["error"]["code"]) == (param, code), answer
    assert "\n" not in answer["error"]["message"] and "Traceback" not in answer["error"]["message"]
    if change.get("n") == 2:  # the client raises its own error class with the same fields
        with pytest.raises(openai.BadRequestError) as caught:
            client(server).chat.completions.create(**body)
        assert caught.value.param == "n" and "n=2 is not supported" in caught.value.message


@pytest.mark.parametrize(("method", "path", "kind", "status"), [
    ("GET", "/v1/embeddings", None, 404),
    ("DELETE", "/v1/models", None, 405),
    ("POST", "/v1/chat/completions", "text/plain", 415),
    ("POST", "/v1/chat/completions", "application/json; bad json", 400),
])
def test_framework_errors_on_v1_are_in_openais_shape_too(served, method, path, kind, status):
    """FastAPI's own answers ({"detail": ...}, 404, 405, 415, a body that is not JSON) never reach a /v1 client."""
    server, *_ = served
    conn = http.client.HTTPConnection(*server.server_address, timeout=30)
    headers = {"Authorization": f"Bearer {KEY}", **({"Content-Type": kind.split(";")[0]} if kind else {})}
    conn.request(method, path, body=b"{not json" if kind else None, headers=headers)
    response = conn.getresponse()
    answer = json.loads(response.read())
    conn.close()
    assert response.status == status and set(answer) == {"error"}, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"} and "detail" not in answer


# -- the queue ------------------------------------------------------------------------------------------------------
def test_a_full_queue_answers_503_with_retry_after(served):
    """Queue size 1: one request generates, one waits, the next is told to come back."""
    server, *_ = served
    c, name = client(server), name_of(server)
    holding = hold(server)
    waiting = threading.Thread(target=lambda: c.chat.completions.create(model=name, messages=CHAT, max_tokens=2))
    waiting.start()
    wait_for(lambda: worker(server).status()["waiting"] == 1)
    with pytest.raises(openai.APIStatusError) as caught:
        c.chat.completions.create(model=name, messages=CHAT, max_tokens=2)
    assert caught.value.status_code == 503 and caught.value.code == "queue_full"
    assert caught.value.response.headers["Retry-After"] == "1"
    assert caught.value.body["type"] == "server_error"
    holding.close()
    waiting.join(timeout=60)
    assert worker(server).idle()


def test_a_request_succeeds_after_the_queue_drains_with_the_clients_default_retries(served):
    server, *_ = served
    name = name_of(server)
    holding = hold(server, max_tokens=240)
    background = client(server)
    waiting = threading.Thread(target=lambda: background.chat.completions.create(model=name, messages=CHAT,
                                                                                 max_tokens=2))
    waiting.start()
    wait_for(lambda: worker(server).status()["waiting"] == 1)
    patient = client(server, max_retries=openai.DEFAULT_MAX_RETRIES)  # honours Retry-After: 1 s
    started = time.monotonic()
    reply = patient.chat.completions.create(model=name, messages=CHAT, max_tokens=2)
    assert reply.choices[0].finish_reason == "length" and time.monotonic() - started >= 0.9  # it was told to wait
    for _ in holding:
        pass
    waiting.join(timeout=60)


def test_a_client_that_leaves_frees_its_place_and_stops_its_generation(served):
    server, *_ = served
    c, name = client(server), name_of(server)
    jobs = worker(server).completed
    holding = hold(server)
    # a streamed request waiting in the queue whose client leaves: its place is free again
    with closing(socket.create_connection(server.server_address, timeout=30)) as sock:
        body = json.dumps({"model": name, "messages": CHAT, "max_tokens": 2, "stream": True}).encode()
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_for(lambda: worker(server).status()["waiting"] == 1)
    wait_for(lambda: worker(server).status()["waiting"] == 0)
    assert worker(server).status()["generating"]  # the held generation still runs
    # the generating client leaves mid-stream: the worker stops before its next token and takes the next request
    holding.close()
    started = time.monotonic()
    reply = c.chat.completions.create(model=name, messages=CHAT, max_tokens=2, temperature=0)
    assert reply.choices[0].finish_reason == "length"
    assert time.monotonic() - started < 10
    assert worker(server).idle()
    assert worker(server).completed == jobs + 2  # the one that left the queue never ran
    held = worker(server).finished[-2]
    assert held.cancelled.is_set() and held.produced < 400


# -- CORS and the command line --------------------------------------------------------------------------------------
def test_allowed_origins_get_cors_on_v1_and_no_other_site_does(served):
    server, *_ = served
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    status, _, headers = raw(server, "OPTIONS", "/v1/chat/completions", key=None, headers=preflight)
    assert status == 204 and headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "authorization" in headers["Access-Control-Allow-Headers"]
    status, body, headers = raw(server, "GET", "/v1/models", headers={"Origin": ORIGIN})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == ORIGIN and body["data"]
    assert raw(server, "GET", "/v1/models", key=None, headers={"Origin": ORIGIN})[0] == 401  # still the key
    status, body, headers = raw(server, "GET", "/v1/models", headers={"Origin": "http://evil.example"})
    assert status == 403 and body["error"]["type"] == "permission_error"
    assert "Access-Control-Allow-Origin" not in headers
    status, _, headers = raw(server, "OPTIONS", "/v1/models", key=None,
                             headers={**preflight, "Origin": "http://evil.example"})
    assert status == 403 and "Access-Control-Allow-Origin" not in headers
    assert raw(server, "GET", "/api/info", headers={"Origin": ORIGIN})[0] == 403  # the explorer's API stays its own


@pytest.mark.parametrize(("args", "message"), [
    (["--max-tokens", "7"], "--max-tokens is gone: the tokens the page draws are --max-drawn-tokens"),
    (["--queue-size", "-1"], "--queue-size=-1 must be at least 0"),
    (["--allowed-origins", "localhost:3000"], "'localhost:3000' is not an origin"),
])
def test_qkv_serve_refuses_bad_api_flags_in_one_line(capsys, args, message):
    """--max-tokens, once the explorer's drawing cap, is gone: max_tokens means OpenAI's new-token count alone."""
    from qkv.cli import main

    assert main(["serve", "--port", "0", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_the_load_benchmark_counts_answers_busy_503s_and_errors_apart(tmp_path):
    """qkv bench serve's logic, a second's worth: a server with no waiting room answers one client at a time and
    tells the others 503 with Retry-After, which the clients honour; nothing else fails and memory is measured."""
    from qkv.bench.serve import format_serve_load, serve_load
    from qkv.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "tiny", *tiny_chat_model())
    result = serve_load(tmp_path / "tiny", clients=3, seconds=1.5, max_tokens=8, queue_size=0, threads=1)
    assert result.errors == 0, result.error_messages
    assert result.ok >= 1 and result.busy >= 1 and 0 < result.completion_tokens <= 8 * result.ok
    assert len(result.latencies) == result.ok and result.rss_start and result.rss_end
    assert "errors 0" in format_serve_load(result)


def test_a_server_that_compiles_answers_as_the_eager_model(served):
    """``qkv serve --compile``: /v1 decodes through the compiled step (compiled as the model loads, one graph for
    every request) and answers what the plain model answers."""
    from torch._dynamo.utils import counters

    eager, model, tokenizer = served
    torch._dynamo.reset()
    counters.clear()
    with make_server(Explorer(model, tokenizer, max_new_tokens=MAX_NEW, compile="eager"), api_key=KEY) as fresh:
        assert counters["stats"]["unique_graphs"] == 1  # compiled before the first request
        for messages, n in ((CHAT, 12), (CHAT + [{"role": "assistant", "content": "ok"},
                                                 {"role": "user", "content": "and then?"}], 9)):
            answers = [client(server).chat.completions.create(model=name_of(server), messages=messages,
                                                              temperature=0, max_tokens=n).choices[0].message.content
                       for server in (eager, fresh)]
            assert answers[0] == answers[1] == greedy(model, tokenizer, messages, n)[2]
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()
