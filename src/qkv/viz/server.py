"""``qkv serve``: the attention explorer, a local web app built on the standard library's HTTP server.

The page (``qkv/viz/static``: plain HTML, CSS, JavaScript and SVG written for qkv; nothing is fetched from
elsewhere) talks to a small JSON API:

- ``GET  /api/info``                       the loaded model, its limits, and checkpoints to pick from;
- ``POST /api/load      {checkpoint}``     load a qkv checkpoint or a pretrained (Hugging Face) directory;
- ``POST /api/attention {text, target?}``  every attention map of the text, with token labels;
- ``POST /api/explain   {text, layer, head, token, kind?, target?}``  one head's anatomy (``qkv.explain``);
- ``GET  /api/generate?text=…&max_new_tokens=…&temperature=…``  a continuation streamed as Server-Sent Events,
  one event per piece of text as each token is chosen, then ``event: done``.

Every request is checked (text length, token counts, layer/head/token ranges, max new tokens); a bad one is
answered with a 4xx status and ``{"error": message}``, never a stack trace. The server binds 127.0.0.1 unless
told otherwise.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlparse

from torch import nn

from ..explain import explain_head
from ..models import DecoderLM
from ..tokenizers import Tokenizer
from .maps import attention_kinds, attention_maps, encode_input

if TYPE_CHECKING:
    from ..generate import GenerationConfig

__all__ = ["Explorer", "RequestError", "make_server", "serve", "find_checkpoints", "STATIC_FILES"]

STATIC_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
MAX_BODY_BYTES = 64 * 1024


class RequestError(ValueError):
    """A request the client can fix; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = int(status)


def find_checkpoints(root: Path, *, max_depth: int = 4, limit: int = 50) -> list[str]:
    """Directories under ``root`` that ``qkv.load`` recognises (qkv checkpoints and runs, pretrained directories),
    skipping hidden folders such as .venv and .git."""
    from ..loading import LOADERS

    root = Path(root)
    found: list[str] = []
    if not root.is_dir():
        return found
    base_depth = len(root.resolve().parts)
    for here, folders, _ in os.walk(root):
        folders[:] = sorted(f for f in folders if not f.startswith((".", "__")) and f != "node_modules")
        path = Path(here)
        if len(path.resolve().parts) - base_depth >= max_depth:
            folders[:] = []
        if any(recognises(path) for _, recognises, _ in LOADERS):
            found.append(str(path))
            folders[:] = []  # a run directory's step-* checkpoints are reached through it
        if len(found) >= limit:
            break
    return found


class Explorer:
    """What the page asks about: one loaded model and tokenizer, and the checks on every request."""

    def __init__(self, model: nn.Module | None = None, tokenizer: Tokenizer | None = None, *,
                 checkpoint: str | Path | None = None, search_root: str | Path | None = None,
                 max_text_chars: int = 2000, max_new_tokens: int = 200, max_tokens: int = 128):
        self.lock = threading.Lock()
        self.model, self.tokenizer = model, tokenizer
        self.source = "in-process model" if model is not None else None
        self.search_root = Path(search_root) if search_root is not None else None
        self.max_text_chars, self.max_new_tokens, self.max_tokens = max_text_chars, max_new_tokens, max_tokens
        if checkpoint is not None:
            self.load(str(checkpoint))

    # -- model ------------------------------------------------------------------------------------------------
    def load(self, checkpoint: str) -> dict:
        """Load a checkpoint or pretrained directory with ``qkv.load`` and make it the current model."""
        from ..loading import load

        if not isinstance(checkpoint, str) or not checkpoint.strip():
            raise RequestError("no checkpoint given; type the path of a checkpoint or pretrained directory")
        path = Path(checkpoint).expanduser()
        if not path.exists():
            raise RequestError(f"checkpoint {checkpoint} does not exist; pick a directory written by `qkv train` "
                               "or a pretrained directory", HTTPStatus.NOT_FOUND)
        model, tokenizer = load(path)
        if tokenizer is None:
            raise RequestError(f"{path} has no tokenizer; add its tokenizer.json (or vocab files) to the directory")
        with self.lock:
            self.model, self.tokenizer, self.source = model.eval(), tokenizer, str(path)
        return self.info()

    def _require_model(self) -> tuple[nn.Module, Tokenizer]:
        if self.model is None or self.tokenizer is None:
            raise RequestError("no model is loaded; pick a checkpoint first", HTTPStatus.CONFLICT)
        return self.model, self.tokenizer

    def info(self) -> dict:
        candidates = find_checkpoints(self.search_root) if self.search_root else []
        if self.model is None:
            return {"loaded": False, "checkpoints": candidates, "max_text_chars": self.max_text_chars,
                    "max_new_tokens": self.max_new_tokens}
        c = self.model.config
        return {
            "loaded": True, "source": self.source, "model_type": self.model.model_type,
            "kinds": attention_kinds(self.model), "d_model": c.d_model, "n_heads": c.n_heads,
            "d_k": c.d_k, "max_seq_len": c.max_seq_len, "positional": c.positional,
            "n_layers": {"encoder": c.n_encoder_layers, "decoder_self": c.n_decoder_layers,
                         "cross": c.n_decoder_layers},
            "can_generate": isinstance(self.model, DecoderLM), "tokenizer": self.tokenizer.kind,
            "checkpoints": candidates, "max_text_chars": self.max_text_chars,
            "max_new_tokens": self.max_new_tokens,
        }

    # -- request checks ---------------------------------------------------------------------------------------
    def _text(self, payload: dict, key: str = "text", *, required: bool = True) -> str | None:
        text = payload.get(key)
        if text is None and not required:
            return None
        if not isinstance(text, str) or not text.strip():
            raise RequestError(f"the {key} is empty; type a sentence")
        if len(text) > self.max_text_chars:
            raise RequestError(f"the {key} has {len(text)} characters; the explorer takes at most "
                               f"{self.max_text_chars}", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        return text

    @staticmethod
    def _int(payload: dict, key: str, default: int | None = None) -> int:
        value = payload.get(key, default)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise RequestError(f"{key} must be an integer, got {value!r}")
        return value

    # -- answers ----------------------------------------------------------------------------------------------
    def attention(self, payload: dict) -> dict:
        model, tokenizer = self._require_model()
        text, target = self._text(payload), self._text(payload, "target", required=False)
        with self.lock:
            inputs = encode_input(model, tokenizer, text, target)
            n_tokens = max(len(inputs.labels), len(inputs.target_labels))
            if n_tokens > self.max_tokens:
                raise RequestError(f"the text has {n_tokens} tokens; the explorer draws at most {self.max_tokens} "
                                   "(every head's map goes to the page): shorten it",
                                   HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            maps = attention_maps(model, tokenizer, text, target, inputs=inputs)
        return maps.to_dict()

    def explain(self, payload: dict) -> dict:
        model, tokenizer = self._require_model()
        text, target = self._text(payload), self._text(payload, "target", required=False)
        kind = payload.get("kind") or None
        with self.lock:
            found = explain_head(model, tokenizer, text, layer=self._int(payload, "layer"),
                                 head=self._int(payload, "head"), token=self._int(payload, "token"),
                                 kind=kind, target=target)
        return found.to_dict()

    def check_generation(self, payload: dict) -> tuple[str, GenerationConfig]:
        """Validate a generation request before the stream starts → its GenerationConfig (prompt checked too)."""
        from ..generate import GenerationConfig

        model, tokenizer = self._require_model()
        if not isinstance(model, DecoderLM):
            raise RequestError(f"a {model.model_type} model does not continue text; load a decoder "
                               "(language model) checkpoint to generate", HTTPStatus.CONFLICT)
        text = self._text(payload)
        n_new = self._int(payload, "max_new_tokens", 20)
        if not 1 <= n_new <= self.max_new_tokens:
            raise RequestError(f"max_new_tokens={n_new} is out of range; ask for 1 to {self.max_new_tokens}")
        try:
            temperature = float(payload.get("temperature", 0.0))
        except (TypeError, ValueError):
            raise RequestError(f"temperature must be a number, got {payload.get('temperature')!r}") from None
        if not 0.0 <= temperature <= 10.0:
            raise RequestError(f"temperature={temperature} is out of range; use 0 (greedy) to 10")
        n_prompt = len(tokenizer.encode(text))
        room = model.config.max_seq_len - n_prompt
        if n_new > room:
            raise RequestError(f"the prompt has {n_prompt} tokens and the context holds "
                               f"{model.config.max_seq_len}: at most {max(room, 0)} new tokens fit; shorten the "
                               "prompt or ask for fewer tokens")
        return text, GenerationConfig(max_new_tokens=n_new, temperature=temperature)

    def generate(self, text: str, config: GenerationConfig) -> Iterator[dict]:
        """Yield the continuation piece by piece (``qkv.generate.stream_text``), as each token is chosen."""
        from ..generate import stream_text

        model, tokenizer = self._require_model()
        pieces = stream_text(model, tokenizer, text, config=config)
        while True:
            with self.lock:  # one model step at a time, shared with the other requests
                piece = next(pieces, None)
            if piece is None:
                return
            yield {"text": piece}


# ----------------------------------------------------------------------------------------------------------------
# HTTP
# ----------------------------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server_version = "qkv-explorer"
    protocol_version = "HTTP/1.1"  # keep-alive, and a chunked body for the event stream
    explorer: Explorer  # set on the subclass make_server creates

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        if getattr(self.server, "verbose", False):
            super().log_message(format, *args)

    # -- responses --------------------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data: dict) -> None:
        self._send(status, json.dumps(data, allow_nan=False, separators=(",", ":")).encode(), "application/json")

    def _error(self, err: Exception) -> None:
        if isinstance(err, RequestError):
            status = err.status
        elif isinstance(err, FileNotFoundError):
            status = HTTPStatus.NOT_FOUND
        elif isinstance(err, (ValueError, TypeError, NotADirectoryError)):
            status = HTTPStatus.BAD_REQUEST
        else:
            status = HTTPStatus.INTERNAL_SERVER_ERROR
            self.log_error("%s: %s", type(err).__name__, err)
            err = RuntimeError(f"the server could not answer ({type(err).__name__}); see its terminal")
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        self._json(status, {"error": message})

    def _payload(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # the unread body cannot be skipped safely
            raise RequestError(f"request body of {length} bytes is larger than {MAX_BODY_BYTES}",
                               HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        try:
            payload = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            raise RequestError("the request body is not valid JSON") from None
        if not isinstance(payload, dict):
            raise RequestError("the request body must be a JSON object")
        return payload

    # -- routes -----------------------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        url = urlparse(self.path)
        try:
            if url.path in ("/", "/index.html"):
                return self._static("index.html")
            if url.path.startswith("/static/"):
                return self._static(url.path[len("/static/"):])
            if url.path == "/api/info":
                return self._json(HTTPStatus.OK, self.explorer.info())
            if url.path == "/api/generate":
                query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
                return self._stream(query)
            raise RequestError(f"no page at {url.path}", HTTPStatus.NOT_FOUND)
        except Exception as err:  # every failure becomes a message, never a traceback
            self._error(err)

    def do_POST(self) -> None:  # noqa: N802
        routes = {"/api/attention": self.explorer.attention, "/api/explain": self.explorer.explain,
                  "/api/load": lambda p: self.explorer.load(p.get("checkpoint"))}
        try:
            payload = self._payload()  # read first: on a kept-alive connection the body must not linger
            route = routes.get(urlparse(self.path).path)
            if route is None:
                raise RequestError(f"no API at {self.path}", HTTPStatus.NOT_FOUND)
            self._json(HTTPStatus.OK, route(payload))
        except Exception as err:
            self._error(err)

    def _static(self, name: str) -> None:
        if name not in STATIC_FILES:
            raise RequestError(f"no file {name!r}", HTTPStatus.NOT_FOUND)
        body = resources.files("qkv.viz").joinpath("static", name).read_bytes()
        self._send(HTTPStatus.OK, body, f"{STATIC_FILES[name]}; charset=utf-8")

    def _stream(self, query: dict) -> None:
        """Server-Sent Events: ``data: {"text"}`` per token, then ``event: done`` (or ``event: error``)."""
        text, config = self.explorer.check_generation(query)  # 4xx before the stream starts
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        # no-cache, not no-store: Chromium reports a streamed no-store fetch as aborted even when it completed
        # (microsoft/playwright#42742); an event stream is never cached either way
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def chunk(body: bytes) -> None:  # HTTP/1.1 chunked encoding: size in hex, CRLF, bytes, CRLF
            self.wfile.write(f"{len(body):x}\r\n".encode() + body + b"\r\n")
            self.wfile.flush()

        def event(data: dict, name: str | None = None) -> None:
            head = f"event: {name}\n" if name else ""
            chunk(f"{head}data: {json.dumps(data)}\n\n".encode())

        try:
            count = 0
            for token in self.explorer.generate(text, config):
                event(token)
                count += 1
            event({"tokens": count}, "done")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return  # the page went away
        except Exception as err:
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            event({"error": message}, "error")
        self.wfile.write(b"0\r\n\r\n")  # the last chunk
        self.wfile.flush()


def make_server(explorer: Explorer, host: str = "127.0.0.1", port: int = 0, *,
                verbose: bool = False) -> ThreadingHTTPServer:
    """An HTTP server for ``explorer`` (port 0: any free port; read it from ``server.server_address``)."""
    handler = type("ExplorerHandler", (_Handler,), {"explorer": explorer})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    server.verbose = verbose
    return server


def serve(explorer: Explorer, host: str = "127.0.0.1", port: int = 8008, *, verbose: bool = True) -> None:
    """Serve until interrupted."""
    server = make_server(explorer, host, port, verbose=verbose)
    try:
        server.serve_forever()
    finally:
        server.server_close()
