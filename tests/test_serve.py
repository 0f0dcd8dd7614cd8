"""The explorer's HTTP API over plain HTTP against a real server on a loopback port: the numbers it sends are the
model's, bad requests get a 4xx and a message, generated text streams one event per token, the page it serves fetches
nothing from elsewhere; and it trusts no web page (a token on every API call, a Host allow-list against DNS
rebinding, no cross-site Origin, JSON-only POSTs, no directory listing, malformed requests answered 400)."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from importlib import resources
from urllib.parse import urlencode

import numpy as np
import pytest
import torch
from fastapi import APIRouter, Depends

from qkv import ModelConfig
from qkv.checkpoint import save_checkpoint
from qkv.explain import explain_head
from qkv.generate import generate_text
from qkv.models import build_model
from qkv.serve import STATIC_FILES, Explorer, make_server, require_token
from qkv.tokenizers import Tokenizer
from qkv.viz import attention_maps

TEXT = "the cat sat on the mat"
KEY = "test-key-0123456789"


def tiny(preset: str = "tiny-decoder"):
    torch.manual_seed(0)
    tokenizer = Tokenizer.char("the cat sat on a mat, the dog ran", ["<bos>"])
    return build_model(ModelConfig.preset(preset, vocab_size=tokenizer.vocab_size)).eval(), tokenizer


@contextmanager
def running(explorer: Explorer, **kwargs):
    """The explorer served by uvicorn from a thread on a free loopback port, with the token KEY."""
    with make_server(explorer, api_key=KEY, **kwargs) as server:
        yield server


@pytest.fixture(scope="module")
def served():
    model, tokenizer = tiny()
    with running(Explorer(model, tokenizer, max_new_tokens=30, max_text_chars=100)) as server:
        yield server, model, tokenizer


def call(server, method: str, path: str, body=None, raw: bytes | None = None, *, token: str | None = KEY,
         headers: dict[str, str] | None = None):
    """(status, JSON or bytes, headers): one request on its own connection. A body goes as application/json and
    the token as Authorization: Bearer unless ``headers`` say otherwise."""
    conn = http.client.HTTPConnection(*server.server_address, timeout=30)
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    head = {"Content-Type": "application/json"} if data is not None else {}
    if token is not None:
        head["Authorization"] = f"Bearer {token}"
    head.update(headers or {})
    conn.request(method, path, body=data, headers=head)
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    kind = response.getheader("Content-Type", "")
    return response.status, json.loads(payload) if kind.startswith("application/json") else payload, response.msg


def request(server, method: str, path: str, body=None, raw: bytes | None = None, **kwargs):
    """(status, JSON or bytes)."""
    return call(server, method, path, body, raw, **kwargs)[:2]


def test_binds_loopback_by_default(served):
    server, *_ = served
    assert server.server_address[0] == "127.0.0.1"
    assert server.url == f"http://127.0.0.1:{server.server_address[1]}/?token={KEY}"


def test_attention_answer_is_the_models_maps(served):
    server, model, tokenizer = served
    status, data = request(server, "POST", "/api/attention", {"text": TEXT})
    assert status == 200
    expected = attention_maps(model, tokenizer, TEXT)
    assert data["labels"]["decoder_self"]["queries"] == tokenizer.pieces(TEXT)
    maps = np.array(data["maps"]["decoder_self"])
    assert np.allclose(maps, expected.maps["decoder_self"].numpy(), atol=1e-5)
    assert np.allclose(maps.sum(-1), 1.0, atol=1e-4)  # every row drawn is a distribution
    assert np.all(np.triu(maps, k=1) == 0)  # and the masked decoder never looks ahead


def test_explain_answer_matches_the_library(served):
    server, model, tokenizer = served
    status, data = request(server, "POST", "/api/explain", {"text": TEXT, "layer": 1, "head": 3, "token": 9})
    assert status == 200
    e = explain_head(model, tokenizer, TEXT, layer=1, head=3, token=9)
    assert data["matches_model"] and data["max_error"] <= 1e-5
    assert np.allclose(data["weights"], e.weights.numpy()) and np.allclose(data["output"], e.output.numpy())


@pytest.mark.parametrize(("path", "body", "status", "message"), [
    ("/api/attention", {"text": ""}, 400, "empty"),
    ("/api/attention", {"text": "   "}, 400, "empty"),
    ("/api/attention", {}, 400, "empty"),
    ("/api/attention", {"text": "a" * 101}, 413, "at most 100"),
    ("/api/attention", {"text": "the zebra"}, 400, "vocabulary lacks: 'b', 'z'"),
    ("/api/explain", {"text": TEXT, "layer": 2, "head": 0, "token": 0}, 400, "layer=2 is out of range"),
    ("/api/explain", {"text": TEXT, "layer": 0, "head": 4, "token": 0}, 400, "head=4 is out of range"),
    ("/api/explain", {"text": TEXT, "layer": 0, "head": 0, "token": 22}, 400, "token=22 is out of range"),
    ("/api/explain", {"text": TEXT, "layer": "x", "head": 0, "token": 0}, 400, "layer must be an integer"),
    ("/api/load", {"checkpoint": "/no/such/dir"}, 404, "does not exist"),
    ("/api/load", {}, 400, "no checkpoint given"),
    ("/api/nothing", {}, 404, "no API"),
])
def test_bad_requests_get_4xx_and_a_message(served, path, body, status, message):
    server, *_ = served
    got, data = request(server, "POST", path, body)
    assert got == status and message in data["error"]
    assert "Traceback" not in data["error"] and "File \"" not in data["error"]


@pytest.mark.parametrize(("path", "body", "message"), [
    ("/api/attention", {"text": 5}, "the text must be a string (text in quotes), got 5 (a number)"),
    ("/api/attention", {"text": ["the cat"]}, 'the text must be a string (text in quotes), got ["the cat"] (a list)'),
    ("/api/attention", {"text": TEXT, "target": 5}, "the target must be a string (text in quotes), got 5"),
    ("/api/explain", {"text": {"a": 1}, "layer": 0, "head": 0, "token": 0}, 'got {"a": 1} (an object)'),
    ("/api/explain", {"text": TEXT, "layer": True, "head": 0, "token": 0}, "layer must be an integer, got true"),
    ("/api/explain", {"text": TEXT, "layer": 0, "head": 1.5, "token": 0}, "head must be an integer, got 1.5"),
    ("/api/explain", {"text": TEXT, "layer": 0, "head": 0, "token": None}, "token must be an integer, got null"),
    ("/api/explain", {"text": TEXT, "layer": 0, "head": 0, "token": 0, "kind": 5},
     "kind must be a string naming an attention of this decoder model (decoder_self), got 5 (a number)"),
    ("/api/explain", {"text": TEXT, "layer": 0, "head": 0, "token": 0, "kind": "cross"},
     "a DecoderLM has no 'cross' attention; choose one of decoder_self"),
    ("/api/load", {"checkpoint": 5}, "checkpoint must be a string (a path in quotes), got 5 (a number)"),
    ("/api/load", {"checkpoint": ["/"]}, 'checkpoint must be a string (a path in quotes), got ["/"] (a list)'),
    ("/api/generate?text=the&max_new_tokens=1.5", None, "max_new_tokens must be an integer, got \"1.5\""),
    ("/api/generate?text=the&temperature=hot", None, "temperature must be a number, got 'hot'"),
])
def test_a_field_of_the_wrong_type_is_named_with_the_type_it_needs(served, path, body, message):
    """A number where text belongs is not 'empty', nor is a list a missing checkpoint: each field of each route
    names what it got and what it takes."""
    server, *_ = served
    status, data = request(server, "POST" if body is not None else "GET", path, body)
    assert status == 400 and message in data["error"], data
    assert request(server, "GET", "/api/info")[1]["source"] == "in-process model"  # nothing was loaded


def test_text_longer_than_the_context_is_refused():
    model, tokenizer = tiny()
    with running(Explorer(model, tokenizer, max_text_chars=10_000)) as server:
        status, data = request(server, "POST", "/api/attention", {"text": "the cat " * 20})
        assert status == 400 and "160 tokens but the model's context holds 128" in data["error"]


def test_the_explorer_caps_the_tokens_it_draws():
    model, tokenizer = tiny()
    with running(Explorer(model, tokenizer, max_drawn_tokens=10)) as server:
        status, info = request(server, "GET", "/api/info")
        assert info["max_drawn_tokens"] == 10 and "max_tokens" not in info  # not OpenAI's max_tokens
        status, data = request(server, "POST", "/api/attention", {"text": "the cat sat"})
        assert status == 413 and "11 tokens; the explorer draws at most 10" in data["error"]


def test_malformed_json_is_a_400(served):
    server, *_ = served
    status, data = request(server, "POST", "/api/attention", raw=b"{not json")
    assert status == 400 and "not valid JSON" in data["error"]


def read_events(server, query: dict) -> tuple[int, list[tuple[str, dict, float]]]:
    """(status, [(event name, data, seconds since the request)]) read from the raw stream as it arrives."""
    conn = http.client.HTTPConnection(*server.server_address, timeout=30)
    start = time.perf_counter()
    conn.request("GET", "/api/generate?" + urlencode(query), headers={"Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    if response.status != 200:
        return response.status, [("error", json.loads(response.read()), 0.0)]
    assert response.getheader("Content-Type").startswith("text/event-stream")
    events, name = [], "message"
    while True:
        line = response.readline().decode()
        if not line:
            break
        if line.startswith("event: "):
            name = line[7:].strip()
        elif line.startswith("data: "):
            events.append((name, json.loads(line[6:]), time.perf_counter() - start))
            name = "message"
    conn.close()
    return 200, events


def test_generation_streams_one_event_per_token_and_equals_generate_text(served):
    server, model, tokenizer = served
    status, events = read_events(server, {"text": "the cat", "max_new_tokens": 12, "temperature": 0})
    assert status == 200
    tokens = [data["text"] for name, data, _ in events if name == "message"]
    assert events[-1][0] == "done" and events[-1][1]["tokens"] == len(tokens) == 12  # one character per token
    expected = generate_text(model, tokenizer, "the cat", 12, temperature=0)
    assert "".join(tokens) == expected  # the continuation only
    arrival = [t for name, _, t in events if name == "message"]
    assert arrival == sorted(arrival)


@pytest.mark.parametrize(("query", "status", "message"), [
    ({"text": "the cat", "max_new_tokens": 0}, 400, "max_new_tokens=0 is out of range; ask for 1 to 30"),
    ({"text": "the cat", "max_new_tokens": 31}, 400, "ask for 1 to 30"),
    ({"text": "the cat", "max_new_tokens": "many"}, 400, "max_new_tokens must be an integer"),
    ({"text": "", "max_new_tokens": 5}, 400, "empty"),
    ({"text": "the cat", "temperature": -1}, 400, "temperature=-1.0 is out of range"),
])
def test_bad_generation_requests_get_4xx_before_the_stream(served, query, status, message):
    server, *_ = served
    got, events = read_events(server, query)
    assert got == status and message in events[0][1]["error"]


def test_generation_slides_past_the_context_but_the_prompt_must_fit_it():
    model, tokenizer = tiny()
    with running(Explorer(model, tokenizer, max_new_tokens=200, max_text_chars=1000)) as server:
        got, events = read_events(server, {"text": "the cat " * 15, "max_new_tokens": 20})  # 120 + 20 > 128
        assert got == 200 and events[-1][0] == "done" and events[-1][1]["tokens"] == 20
        got, events = read_events(server, {"text": "the cat " * 17, "max_new_tokens": 5})  # 136 > 128
        assert got == 400 and "prompt of 136 tokens is longer than max_seq_len=128" in events[0][1]["error"]


def test_loading_a_checkpoint_switches_the_model(tmp_path):
    model, tokenizer = tiny("tiny-encoder")
    save_checkpoint(tmp_path / "enc", model, tokenizer)
    with running(Explorer(search_root=tmp_path)) as server:
        status, info = request(server, "GET", "/api/info")
        assert status == 200 and not info["loaded"] and info["checkpoints"] == [str(tmp_path / "enc")]
        status, data = request(server, "POST", "/api/attention", {"text": TEXT})
        assert status == 409 and "pick a checkpoint" in data["error"]
        status, info = request(server, "POST", "/api/load", {"checkpoint": str(tmp_path / "enc")})
        assert status == 200 and info["model_type"] == "encoder" and not info["can_generate"]
        assert info["n_layers"] == {"encoder": 2}  # the layers of the kinds this model has, nothing else
        status, data = request(server, "POST", "/api/attention", {"text": TEXT})
        assert status == 200 and data["kinds"] == ["encoder"]
        got, events = read_events(server, {"text": "the cat", "max_new_tokens": 3})
        assert got == 409 and "does not continue text" in events[0][1]["error"]


class Interleaved(Explorer):
    """The real explorer with two meeting points a test arms: ``replying`` where a load builds its reply (``info``),
    ``taken`` right after a request has taken the model that answers it (``current``), then held until ``go_on``."""

    replying: threading.Barrier | None = None
    taken: threading.Barrier | None = None
    go_on = threading.Event()

    def info(self, *args, **kwargs):
        if self.replying is not None:
            self.replying.wait()
        return super().info(*args, **kwargs)

    def current(self):
        served = super().current()
        if self.taken is not None:
            self.taken.wait()
            assert self.go_on.wait(timeout=30), "the test never let the request go on"
        return served


def concurrently(*calls) -> list:
    """Run each call in its own thread; their results in order (an exception is re-raised)."""
    results: list = [None] * len(calls)

    def run(i, call):
        try:
            results[i] = call()
        except BaseException as err:  # noqa: BLE001 - re-raised in the test's thread
            results[i] = err

    threads = [threading.Thread(target=run, args=(i, call), daemon=True) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    return threads, results


def finish(threads, results) -> list:
    for thread in threads:
        thread.join(timeout=60)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def test_concurrent_requests_are_each_answered_by_the_model_their_reply_names(tmp_path):
    """Two runs (A: 2 layers of 4 heads; B: 1 layer of 2 heads). (1) Two /api/load at once, both past the model
    swap before either builds its reply: each reply describes its own run (was: both the run loaded last). (2)
    Attention, explain and generation requests take the model, then a load swaps it before they compute: each reply
    names the run that computed it and holds that run's numbers."""
    runs = {}
    for name, heads, layers in (("A", 4, 2), ("B", 2, 1)):
        torch.manual_seed(len(name) + heads)
        tokenizer = Tokenizer.char("the cat sat on a mat, the dog ran", ["<bos>"])
        config = ModelConfig.preset("tiny-decoder", vocab_size=tokenizer.vocab_size, n_heads=heads,
                                    n_decoder_layers=layers)
        model = build_model(config).eval()
        save_checkpoint(tmp_path / name, model, tokenizer)
        runs[str(tmp_path / name)] = (model, tokenizer)
    a, b = runs
    explorer = Interleaved()
    with running(explorer) as server:
        explorer.replying = threading.Barrier(2, timeout=30)
        loads = finish(*concurrently(*(lambda run=run: request(server, "POST", "/api/load", {"checkpoint": run})
                                       for run in (a, b))))
        explorer.replying = None
        for run, (status, info) in zip((a, b), loads, strict=True):
            assert status == 200 and info["source"] == run, (run, info["source"])
            assert info["n_heads"] == runs[run][0].config.n_heads

        first = request(server, "GET", "/api/info")[1]["source"]
        other = b if first == a else a
        model, tokenizer = runs[first]
        explorer.taken, explorer.go_on = threading.Barrier(4, timeout=30), threading.Event()
        pending = concurrently(
            lambda: request(server, "POST", "/api/attention", {"text": TEXT}),
            lambda: request(server, "POST", "/api/explain", {"text": TEXT, "layer": 0, "head": 1, "token": 5}),
            lambda: read_events(server, {"text": "the cat", "max_new_tokens": 8}),
        )
        explorer.taken.wait()  # all three hold the model `first`
        status, info = request(server, "POST", "/api/load", {"checkpoint": other})
        assert status == 200 and info["source"] == other
        explorer.go_on.set()
        (s1, maps), (s2, head), (s3, events) = finish(*pending)
        explorer.taken = None
        assert s1 == s2 == s3 == 200
        assert maps["source"] == first and maps["n_heads"] == {"decoder_self": model.config.n_heads}
        assert maps["n_layers"] == {"decoder_self": model.config.n_decoder_layers}
        expected = explain_head(model, tokenizer, TEXT, layer=0, head=1, token=5)
        assert head["source"] == first and np.allclose(head["weights"], expected.weights.numpy(), atol=1e-5)
        assert events[-1] == ("done", {"tokens": 8, "source": first}, events[-1][2])
        assert "".join(d["text"] for n, d, _ in events if n == "message") == generate_text(
            model, tokenizer, "the cat", 8, temperature=0)
        status, maps = request(server, "POST", "/api/attention", {"text": TEXT})
        assert maps["source"] == other and maps["n_heads"] == {"decoder_self": runs[other][0].config.n_heads}


def test_page_is_served_by_qkv_and_fetches_nothing_from_elsewhere(served):
    server, *_ = served
    status, page = request(server, "GET", f"/?token={KEY}")
    assert status == 200 and b"/static/app.js" in page and b"/static/style.css" in page
    for name in STATIC_FILES:
        status, body = request(server, "GET", f"/static/{name}")
        assert status == 200 and body == resources.files("qkv.serve").joinpath("static", name).read_bytes()
        text = body.decode()
        urls = re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"'`)]*", text)
        assert [u for u in urls if u != "http://www.w3.org/2000/svg"] == []  # the SVG namespace is a name only
        assert "@import" not in text
    status, data = request(server, "GET", "/static/../server.py")
    assert status == 404


# ---------------------------------------------------------------------------------------------------------------
# The server trusts no web page
# ---------------------------------------------------------------------------------------------------------------

API_CALLS = [
    ("GET", "/api/info", None),
    ("POST", "/api/attention", {"text": TEXT}),
    ("POST", "/api/explain", {"text": TEXT, "layer": 0, "head": 0, "token": 0}),
    ("POST", "/api/load", {"checkpoint": "/"}),
    ("GET", "/api/generate?text=the+cat&max_new_tokens=3", None),
    ("POST", "/api/nothing", {}),
]


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", f"Token {KEY}", f"Basic {KEY}", "Bearer "])
def test_every_api_call_needs_the_token(served, authorization):
    server, *_ = served
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path, body in API_CALLS:
        status, data, head = call(server, method, path, body, token=None, headers=headers)
        assert status == 401 and "token" in data["error"] and head["WWW-Authenticate"] == "Bearer", path
    status, info = request(server, "GET", "/api/info")
    assert status == 200 and info["source"] == "in-process model"  # /api/load was never run


def test_the_page_holds_no_data_and_a_wrong_token_in_its_url_gets_a_form(served):
    """The page comes without a token (a reload, once its script has moved the token out of the address bar, finds
    it in sessionStorage; without one the page asks for it): every answer it shows comes from the API."""
    server, *_ = served
    for path in ("/?token=wrong", f"/?token={KEY}x", "/?token="):
        status, page = request(server, "GET", path, token=None)
        assert status == 401 and b'name="token"' in page and b"app.js" not in page  # a form asking again
    for path in (f"/?token={KEY}", "/", "/index.html"):
        status, page = request(server, "GET", path, token=None)
        assert status == 200 and b"/static/app.js" in page and b'id="token-form"' in page
        assert b"in-process model" not in page and KEY.encode() not in page
    status, script = request(server, "GET", "/static/app.js", token=None)
    assert status == 200 and b"Authorization: `Bearer ${sessionStorage.getItem(TOKEN_KEY)" in script
    assert b"history.replaceState" in script


def test_a_random_token_by_default_in_the_printed_url():
    model, tokenizer = tiny()
    servers = [make_server(Explorer(model, tokenizer)) for _ in range(2)]
    try:
        tokens = [s.api_key for s in servers]
        assert all(re.fullmatch(r"[0-9a-f]{48}", t) for t in tokens) and tokens[0] != tokens[1]
        assert servers[0].url.endswith(f"/?token={tokens[0]}")
    finally:
        for s in servers:
            s.server_close()


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.evil.example:{port}",
                                  "localhost.evil.example", "[::2]:{port}", "", "local host"])
def test_a_host_not_on_the_allow_list_is_refused(served, host):
    """DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1 sends Host: evil.example."""
    server, *_ = served
    host = host.format(port=server.server_address[1])
    for path in ("/api/info", f"/?token={KEY}", "/static/app.js"):
        status, data = request(server, "GET", path, headers={"Host": host})
        assert status == 403 and "--allowed-hosts" in data["error"], (host, path)


@pytest.mark.parametrize("host", ["localhost:{port}", "127.0.0.1:{port}", "[::1]:{port}", "LOCALHOST", "127.0.0.1"])
def test_loopback_hosts_are_allowed(served, host):
    server, *_ = served
    status, info = request(server, "GET", "/api/info", headers={"Host": host.format(port=server.server_address[1])})
    assert status == 200 and info["loaded"]


def test_allowed_hosts_extend_the_list():
    model, tokenizer = tiny()
    with running(Explorer(model, tokenizer), allowed_hosts=["Box.lan", "192.168.1.20"]) as server:
        port = server.server_address[1]
        for host in (f"box.lan:{port}", f"192.168.1.20:{port}", f"localhost:{port}"):
            assert request(server, "GET", "/api/info", headers={"Host": host})[0] == 200
        assert request(server, "GET", "/api/info", headers={"Host": f"other.lan:{port}"})[0] == 403
    for bad in ("*", "", "http://box.lan/"):
        with pytest.raises(ValueError, match="is not a host name"):
            make_server(Explorer(model, tokenizer), allowed_hosts=[bad])


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://localhost:{port}",
                                    "http://127.0.0.1:1", "file://", "http://127.0.0.1:{port}.evil.example"])
def test_a_cross_site_origin_is_refused(served, origin):
    server, *_ = served
    origin = origin.format(port=server.server_address[1])
    for method, path, body in API_CALLS:
        status, data = request(server, method, path, body, headers={"Origin": origin})
        assert status == 403 and "may not call this explorer" in data["error"], (origin, path)
    status, info = request(server, "GET", "/api/info")
    assert info["source"] == "in-process model"


def test_same_origin_and_no_origin_requests_with_the_token_pass(served):
    server, model, tokenizer = served
    port = server.server_address[1]
    for headers in ({"Origin": f"http://127.0.0.1:{port}"}, {}, {"Origin": f"http://localhost:{port}",
                                                                 "Host": f"localhost:{port}"}):
        status, data = request(server, "POST", "/api/attention", {"text": TEXT}, headers=headers)
        assert status == 200 and data["labels"]["decoder_self"]["queries"] == tokenizer.pieces(TEXT)


@pytest.mark.parametrize("kind", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x",
                                  "", "application/jsonx", "text/json"])
def test_posts_must_be_sent_as_json(served, kind):
    """A page may send a "simple" cross-site POST (text/plain, form) without a CORS preflight: refused."""
    server, *_ = served
    status, data = request(server, "POST", "/api/attention", {"text": TEXT}, headers={"Content-Type": kind})
    assert status == 415 and "Content-Type: application/json" in data["error"]
    status, _ = request(server, "POST", "/api/attention", {"text": TEXT},
                        headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert status == 200


def test_the_cross_site_load_request_is_refused(served):
    """``curl -X POST -H 'Content-Type: text/plain' --data '{"checkpoint": "/"}' http://127.0.0.1:PORT/api/load``,
    the request any page could send, is refused: without the token (401), from another site's page (403), and as
    text/plain even with the token (415). The model stays the one loaded."""
    server, *_ = served
    plain = {"Content-Type": "text/plain"}
    raw = b'{"checkpoint": "/"}'
    assert request(server, "POST", "/api/load", raw=raw, token=None, headers=plain)[0] == 401
    assert request(server, "POST", "/api/load", raw=raw, token=None,
                   headers={**plain, "Origin": "http://evil.example"})[0] == 403
    assert request(server, "POST", "/api/load", raw=raw, headers=plain)[0] == 415
    status, info = request(server, "GET", "/api/info")
    assert info["source"] == "in-process model"


def test_loading_a_directory_that_is_no_checkpoint_names_none_of_its_files(served, tmp_path):
    server, *_ = served
    names = ["private-notes.txt", "pytorch_model.bin", "id_ed25519", "config.yaml"]
    for name in names:
        (tmp_path / name).write_text("x")
    (tmp_path / "photos").mkdir()
    for path in (tmp_path, tmp_path / "private-notes.txt"):
        status, data = request(server, "POST", "/api/load", {"checkpoint": str(path)})
        assert status == 400 and "is not a checkpoint qkv can load" in data["error"]
        assert not any(name in data["error"].replace(str(path), "") for name in [*names, "photos"]), data["error"]


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.mark.parametrize("length", ["-1", "abc", "1e3", "12, 13", "0x10"])
def test_a_malformed_content_length_is_a_400_and_does_not_desync(served, length):
    """The bytes after a bad Content-Length must not be read as a second request on the same connection, and the
    server must go on answering."""
    server, *_ = served
    host, port = server.server_address
    smuggled = f"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {KEY}\r\n\r\n"
    head = (f"POST /api/load HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n")
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall((head + smuggled).encode())
        answer = read_until_closed(sock)  # the server closes the connection: no hang, no second answer
    assert answer.startswith(b"HTTP/1.1 400 ") and answer.count(b"HTTP/1.1 ") == 1, answer
    status, info = request(server, "GET", "/api/info")
    assert status == 200 and info["source"] == "in-process model"


def test_a_router_takes_the_same_locks():
    """More routes take the explorer's token by one dependency (as the OpenAI-compatible /v1 router does, see
    tests/test_openai_api.py), and its Host and Origin checks with nothing at all."""
    model, tokenizer = tiny()
    server = make_server(Explorer(model, tokenizer), api_key=KEY)
    more = APIRouter(prefix="/more", dependencies=[Depends(require_token)])
    more.add_api_route("/things", lambda: {"object": "list", "data": []})
    server.app.include_router(more)
    with server:
        assert request(server, "GET", "/more/things", token=None)[0] == 401
        assert request(server, "GET", "/more/things", headers={"Origin": "http://evil.example"})[0] == 403
        assert request(server, "GET", "/more/things", headers={"Host": "evil.example"})[0] == 403
        assert request(server, "GET", "/more/things") == (200, {"object": "list", "data": []})
        for path in ("/v1/models", "/more/things"):
            assert request(server, "GET", path, headers={"Origin": "http://evil.example"})[0] == 403


def test_qkv_serve_command_prints_its_url_logs_no_token_and_survives_a_client_that_leaves(tmp_path):
    model, tokenizer = tiny()
    save_checkpoint(tmp_path / "dec", model, tokenizer)
    env = {**os.environ, "QKV_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "qkv", "serve", "--checkpoint", str(tmp_path / "dec"),
                             "--port", "0", "--root", str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # the server prints its address once it listens
        match = re.search(rf"http://127\.0\.0\.1:(\d+)/\?token={KEY}\s", line)
        assert match, line + proc.stderr.read()
        port = int(match.group(1))

        def get(path: str, token: str | None = KEY) -> tuple[int, dict]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
            response = conn.getresponse()
            answer = response.status, json.loads(response.read())
            conn.close()
            return answer

        assert get("/api/info", token=None)[0] == 401
        # the token in a URL, right or wrong, where the page takes it and where the API does not: never logged
        for path in (f"/?token={KEY}", f"/index.html?x=1&token={KEY}", "/?token=a-guess", f"/api/info?token={KEY}",
                     f"/api/generate?text=the&token={KEY}", f"/{KEY}"):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", path)
            conn.getresponse().read()
            conn.close()
        status, info = get("/api/info")
        assert info["loaded"] and info["source"] == str(tmp_path / "dec") and info["can_generate"]
        assert info["checkpoints"] == [str(tmp_path / "dec")]
        # clients that leave early: after the first generated token, halfway through a body, within the headers
        head = f"Host: 127.0.0.1:{port}\r\nAuthorization: Bearer {KEY}\r\n"
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(f"GET /api/generate?text=the+cat&max_new_tokens=120 HTTP/1.1\r\n{head}\r\n".encode())
            assert b"data: " in sock.recv(65536) or b"data: " in sock.recv(65536)
        for partial in (f"POST /api/load HTTP/1.1\r\n{head}Content-Type: application/json\r\n"
                        'Content-Length: 100\r\n\r\n{"checkpoint": ', f"GET /api/info HTTP/1.1\r\n{head}"):
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(partial.encode())
                time.sleep(0.2)  # the server has read what was sent
        assert get("/api/info")[0] == 200  # still answering
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        err, log = proc.stderr.read(), proc.stdout.read()
        proc.stdout.close()
        proc.stderr.close()
    assert "Traceback" not in err and "Exception" not in err, err
    assert KEY not in log + err and "a-guess" not in log + err, log + err
    for line in ('"GET /?token=[redacted] HTTP/1.1" 200', '"GET /index.html?x=1&token=[redacted] HTTP/1.1" 200',
                 '"GET /?token=[redacted] HTTP/1.1" 401', '"GET /api/info?token=[redacted] HTTP/1.1" 401',
                 '"GET /api/generate?text=the&token=[redacted] HTTP/1.1" 401', '"GET /[redacted] HTTP/1.1" 404'):
        assert line in log, log  # each request is in the access log, without its token


@pytest.mark.parametrize(("args", "message"), [
    (["--checkpoint", "{tmp}/nope"], "does not exist"),
    (["--api-key", " "], "the API key is empty"),
    (["--allowed-hosts", "box.lan,*"], "'*' is not a host name"),
    (["--max-drawn-tokens", "0"], "--max-drawn-tokens=0 must be at least 1"),
])
def test_qkv_serve_with_bad_input_says_so_in_one_line_and_exits_2(tmp_path, capsys, args, message):
    from qkv.cli import main

    assert main(["serve", "--port", "0", *[a.format(tmp=tmp_path) for a in args]]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_the_explorers_drawing_cap_is_max_drawn_tokens_alone():
    """--max-tokens, the drawing cap's old name, is gone (test_openai_api: it is refused in one line), so that
    max_tokens means the OpenAI API's count of new tokens alone."""
    from qkv.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["serve", "--max-drawn-tokens", "9"]).max_drawn_tokens == 9
    assert parser.parse_args(["serve"]).max_drawn_tokens == 128
    assert "--max-tokens" not in parser._subparsers._group_actions[0].choices["serve"].format_help()
