"""The explorer's HTTP API: the numbers it sends are the model's, bad requests get a 4xx and a message, generated
text streams one event per token, and the page it serves fetches nothing from elsewhere."""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from importlib import resources
from urllib.parse import urlencode

import numpy as np
import pytest
import torch

from qkv import ModelConfig
from qkv.checkpoint import save_checkpoint
from qkv.explain import explain_head
from qkv.generate import generate_text
from qkv.models import build_model
from qkv.tokenizers import Tokenizer
from qkv.viz import attention_maps
from qkv.viz.server import STATIC_FILES, Explorer, make_server

TEXT = "the cat sat on the mat"


def tiny(preset: str = "tiny-decoder"):
    torch.manual_seed(0)
    tokenizer = Tokenizer.char("the cat sat on a mat, the dog ran", ["<bos>"])
    return build_model(ModelConfig.preset(preset, vocab_size=tokenizer.vocab_size)).eval(), tokenizer


@pytest.fixture(scope="module")
def served():
    model, tokenizer = tiny()
    explorer = Explorer(model, tokenizer, max_new_tokens=30, max_text_chars=100)
    server = make_server(explorer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, model, tokenizer
    server.shutdown()
    server.server_close()


def request(server, method: str, path: str, body=None, raw: bytes | None = None):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    kind = response.getheader("Content-Type", "")
    return response.status, json.loads(payload) if kind.startswith("application/json") else payload


def test_binds_loopback_by_default(served):
    server, *_ = served
    assert server.server_address[0] == "127.0.0.1"


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


def test_text_longer_than_the_context_is_refused():
    model, tokenizer = tiny()
    server = make_server(Explorer(model, tokenizer, max_text_chars=10_000))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        status, data = request(server, "POST", "/api/attention", {"text": "the cat " * 20})
        assert status == 400 and "160 tokens but the model's context holds 128" in data["error"]
    finally:
        server.shutdown()
        server.server_close()


def test_the_explorer_caps_the_tokens_it_draws():
    model, tokenizer = tiny()
    server = make_server(Explorer(model, tokenizer, max_tokens=10))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        status, data = request(server, "POST", "/api/attention", {"text": "the cat sat"})
        assert status == 413 and "11 tokens; the explorer draws at most 10" in data["error"]
    finally:
        server.shutdown()
        server.server_close()


def test_malformed_json_is_a_400(served):
    server, *_ = served
    status, data = request(server, "POST", "/api/attention", raw=b"{not json")
    assert status == 400 and "not valid JSON" in data["error"]


def read_events(server, query: dict) -> tuple[int, list[tuple[str, dict, float]]]:
    """(status, [(event name, data, seconds since the request)]) read from the raw stream as it arrives."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    start = time.perf_counter()
    conn.request("GET", "/api/generate?" + urlencode(query))
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


def test_prompt_plus_new_tokens_must_fit_the_context():
    model, tokenizer = tiny()
    server = make_server(Explorer(model, tokenizer, max_new_tokens=200, max_text_chars=1000))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        got, events = read_events(server, {"text": "the cat " * 15, "max_new_tokens": 20})
        assert got == 400 and "at most 8 new tokens fit" in events[0][1]["error"]
    finally:
        server.shutdown()
        server.server_close()


def test_loading_a_checkpoint_switches_the_model(tmp_path):
    model, tokenizer = tiny("tiny-encoder")
    save_checkpoint(tmp_path / "enc", model, tokenizer)
    server = make_server(Explorer(search_root=tmp_path))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        status, info = request(server, "GET", "/api/info")
        assert status == 200 and not info["loaded"] and info["checkpoints"] == [str(tmp_path / "enc")]
        status, data = request(server, "POST", "/api/attention", {"text": TEXT})
        assert status == 409 and "pick a checkpoint" in data["error"]
        status, info = request(server, "POST", "/api/load", {"checkpoint": str(tmp_path / "enc")})
        assert status == 200 and info["model_type"] == "encoder" and not info["can_generate"]
        status, data = request(server, "POST", "/api/attention", {"text": TEXT})
        assert status == 200 and data["kinds"] == ["encoder"]
        got, events = read_events(server, {"text": "the cat", "max_new_tokens": 3})
        assert got == 409 and "does not continue text" in events[0][1]["error"]
    finally:
        server.shutdown()
        server.server_close()


def test_page_is_served_by_qkv_and_fetches_nothing_from_elsewhere(served):
    server, *_ = served
    status, page = request(server, "GET", "/")
    assert status == 200 and b"/static/app.js" in page and b"/static/style.css" in page
    for name in STATIC_FILES:
        status, body = request(server, "GET", f"/static/{name}")
        assert status == 200 and body == resources.files("qkv.viz").joinpath("static", name).read_bytes()
        text = body.decode()
        urls = re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"'`)]*", text)
        assert [u for u in urls if u != "http://www.w3.org/2000/svg"] == []  # the SVG namespace is a name only
        assert "@import" not in text
    status, data = request(server, "GET", "/static/../server.py")
    assert status == 404


def test_qkv_serve_command_binds_loopback_and_serves_the_checkpoint(tmp_path):
    import subprocess
    import sys

    model, tokenizer = tiny()
    save_checkpoint(tmp_path / "dec", model, tokenizer)
    proc = subprocess.Popen([sys.executable, "-m", "qkv", "serve", "--checkpoint", str(tmp_path / "dec"),
                             "--port", "0", "--root", str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # the server prints its address once it listens
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match, line + proc.stderr.read()
        conn = http.client.HTTPConnection("127.0.0.1", int(match.group(1)), timeout=30)
        conn.request("GET", "/api/info")
        info = json.loads(conn.getresponse().read())
        conn.close()
        assert info["loaded"] and info["source"] == str(tmp_path / "dec") and info["can_generate"]
        assert info["checkpoints"] == [str(tmp_path / "dec")]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()


def test_qkv_serve_with_a_missing_checkpoint_says_so_and_exits_2(tmp_path, capsys):
    from qkv.cli import main

    assert main(["serve", "--checkpoint", str(tmp_path / "nope"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1
