"""OpenAI-compatible routes on ``qkv serve``: the clients people already use (the ``openai`` package, LangChain,
curl) talk to the loaded model, behind the explorer's locks (token, Host, Origin).

- ``GET  /v1/models``             the model served (one), as ``{"object": "list", "data": [...]}``;
- ``POST /v1/chat/completions``   a conversation → the assistant's reply, rendered with the model's own chat
  template (``qkv.chat_template``; the plain format for a model without one);
- ``POST /v1/completions``        a prompt → its continuation;
- ``GET  /health``                readiness, without the key: ``{"status": "ok", ...}`` (503 with no model).

Both completions answer at once or, with ``"stream": true``, as Server-Sent Events (``data: {json}\\n\\n``, one
chunk per piece of text, ``finish_reason`` null until the last chunk, then ``data: [DONE]``); with
``stream_options.include_usage`` one more chunk carries ``usage`` with ``choices: []``. The streamed pieces joined
are the text answered at once. Honoured: ``max_tokens`` / ``max_completion_tokens`` (at most the server's
``--max-new-tokens``), ``temperature`` (0 = greedy; never replaced by a default), ``top_p``, ``stop`` (a string or
a list), ``seed`` (a generator of the request's own: the same seed gives the same text, whatever else the server
ran). Refused with 400 naming the parameter: what qkv does not do (``n`` > 1, ``logprobs``, ``tools``, ...) and any
name OpenAI does not define. ``usage.prompt_tokens_details.cached_tokens`` counts the prompt tokens the server did
not recompute.

One worker thread runs the model (:class:`Worker`): requests wait in a queue of ``--queue-size`` places (a full
queue answers 503 with ``Retry-After``); a client that leaves frees its place or stops its generation. The worker
keeps one conversation (``qkv.generation.conversation.Conversation``): a request that extends the previous one (an
OpenAI client resends the whole history each turn) computes only the tokens after the prefix they share, as
llama.cpp's server does.

Errors come in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, for every path under ``/v1``,
the explorer's refusals (401, 403, 404, 413, 415) included: :func:`mount` puts the routes on an app and makes its
error handlers answer so there.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import torch
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from ..chat_template import ChatTemplate, ChatTemplateError
from ..errors import OptionError
from ..models import model_type_of, unwrap
from .explorer import Explorer, RequestError, Served
from .security import read_json, require_token

if TYPE_CHECKING:
    from ..generation import GenerationConfig

__all__ = ["APIError", "Worker", "mount", "router", "health", "error_body", "refusal", "model_id", "V1_PATHS",
           "MAX_API_BODY_BYTES", "DEFAULT_QUEUE_SIZE"]

V1_PATHS = ("/v1", "/health")  # the paths whose errors take OpenAI's shape
MAX_API_BODY_BYTES = 4 * 1024 * 1024  # a whole conversation is resent with every request
DEFAULT_QUEUE_SIZE = 16
RETRY_AFTER_S = 1
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions (chat: as many as fit)


# -- errors ---------------------------------------------------------------------------------------------------------
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
               404: "invalid_request_error", 405: "invalid_request_error", 409: "invalid_request_error",
               413: "invalid_request_error", 415: "invalid_request_error", 422: "invalid_request_error",
               503: "server_error"}


class APIError(Exception):
    """An answer in OpenAI's error shape: the status, a one-line message, and ``param`` / ``code`` when known."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = int(status), message, param, code
        self.type = type or ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else
                                            "invalid_request_error")
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status, headers=self.headers)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """``{"error": {"message", "type", "param", "code"}}``, as OpenAI answers an error."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _one_line(err: BaseException | str) -> str:
    text = str(err)
    return text.splitlines()[0] if text.strip() else type(err).__name__


def _as_api_error(request: Request, err: Exception) -> APIError:
    """Any error raised while answering a /v1 request, as the APIError a client of OpenAI's API expects."""
    if isinstance(err, APIError):
        return err
    if isinstance(err, StarletteHTTPException):
        status = err.status_code
        if status == 401:
            return APIError(401, "the API key is missing or wrong: send the key `qkv serve` printed (the token in "
                                 "its URL, or --api-key / QKV_API_KEY) as Authorization: Bearer KEY (the openai "
                                 "client's api_key)", code="invalid_api_key", headers=err.headers)
        if status == 404:
            return APIError(404, f"no API at {request.url.path}; the routes are /v1/models, /v1/chat/completions "
                                 "and /v1/completions", code="not_found")
        if status == 405:
            return APIError(405, f"{request.method} is not allowed on {request.url.path}",
                            code="method_not_allowed", headers=err.headers)
        return APIError(status, str(err.detail), headers=err.headers)
    if isinstance(err, RequestValidationError):
        return _validation_error(err.errors())
    if isinstance(err, RequestError):
        return APIError(err.status, _one_line(err))
    if isinstance(err, (ValueError, TypeError)):
        return APIError(400, _one_line(err))
    return APIError(500, f"the server could not answer ({type(err).__name__}); see its terminal",
                    type="server_error")


def _param(loc: Iterable[Any]) -> str | None:
    """pydantic's location ``("messages", 0, "content")`` → OpenAI's ``messages[0].content``."""
    text = ""
    for part in loc:
        if part in ("body",) and not text:
            continue
        if isinstance(part, int):
            text += f"[{part}]"
        elif isinstance(part, str) and not part.startswith(("function-", "list[", "str", "int", "float", "bool",
                                                          "literal[", "dict[", "tagged-union[")):
            text += f".{part}" if text else part
    return text or None


def _validation_error(errors: list[dict]) -> APIError:
    """pydantic's first complaint as one line naming the parameter (400, as OpenAI answers a bad parameter)."""
    first = next((e for e in errors if e.get("type") == "extra_forbidden"), errors[0])
    param = _param(first.get("loc", ()))
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"unrecognized request argument supplied: {param}; qkv serve knows OpenAI's parameters "
                             "only", param=param, code="unknown_parameter")
    if first.get("type") == "missing":
        return APIError(400, f"missing required parameter: {param}", param=param, code="missing_required_parameter")
    shown = repr(first.get("input"))
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return APIError(400, f"invalid value for {param}: {shown} ({first.get('msg', 'invalid').lower()})", param=param,
                    code="invalid_value")


# -- requests -------------------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # OpenAI's padding against length side channels: nothing to pad here


class _Sampling(_Strict):
    """What both completions take (OpenAI's names and ranges)."""

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**64 - 1)] | None = None  # what torch.Generator takes
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = None
    logprobs: Any = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    user: str | None = None  # a caller's label: accepted, as OpenAI does, and not used


class ChatRequest(_Sampling):
    messages: Annotated[list[dict[str, Any]], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    top_logprobs: int | None = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    metadata: dict[str, Any] | None = None  # stored-completion fields: accepted, nothing is stored
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


def _parse(kind: type[_Sampling], payload: dict) -> Any:
    try:
        return kind.model_validate(payload)
    except ValidationError as err:
        raise _validation_error(err.errors()) from None


# name → (the values qkv serve takes, what to say when another is sent)
UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "n": (lambda v: v in (None, 1), "qkv serve writes one choice per request (n=1); send n requests"),
    "best_of": (lambda v: v in (None, 1), "qkv serve writes one choice per request (best_of=1)"),
    "logprobs": (lambda v: v in (None, False, 0), "qkv serve does not return log-probabilities; leave logprobs "
                                                  "unset"),
    "top_logprobs": (lambda v: v in (None, 0), "qkv serve does not return log-probabilities; leave top_logprobs "
                                               "unset"),
    "echo": (lambda v: v in (None, False), "qkv serve does not echo the prompt; leave echo unset"),
    "suffix": (lambda v: v in (None, ""), "qkv serve does not insert text (no suffix); leave it unset"),
    "tools": (lambda v: v in (None, []), "qkv serve does not call tools; leave tools unset"),
    "tool_choice": (lambda v: v in (None, "none"), "qkv serve does not call tools; leave tool_choice unset"),
    "functions": (lambda v: v in (None, []), "qkv serve does not call functions; leave functions unset"),
    "function_call": (lambda v: v in (None, "none"), "qkv serve does not call functions; leave function_call unset"),
    "response_format": (lambda v: v in (None, {"type": "text"}),
                        "qkv serve writes plain text only (response_format {\"type\": \"text\"})"),
    "modalities": (lambda v: v in (None, ["text"]), "qkv serve writes text only (modalities [\"text\"])"),
    "audio": (lambda v: v is None, "qkv serve writes text only; leave audio unset"),
    "prediction": (lambda v: v is None, "qkv serve takes no predicted output; leave prediction unset"),
    "reasoning_effort": (lambda v: v is None, "the model served does not reason in steps; leave reasoning_effort "
                                              "unset"),
    "verbosity": (lambda v: v is None, "qkv serve has no verbosity setting; leave verbosity unset"),
    "web_search_options": (lambda v: v is None, "qkv serve does not search the web"),
    "presence_penalty": (lambda v: v in (None, 0), "qkv serve has no presence penalty; leave presence_penalty "
                                                   "unset (or 0)"),
    "frequency_penalty": (lambda v: v in (None, 0), "qkv serve has no frequency penalty; leave frequency_penalty "
                                                    "unset (or 0)"),
    "logit_bias": (lambda v: not v, "qkv serve does not bias logits; leave logit_bias unset"),
}


def _refuse_unsupported(body: _Sampling) -> None:
    for name in body.model_fields_set:
        rule = UNSUPPORTED.get(name)
        if rule is not None and not rule[0](getattr(body, name)):
            raise APIError(400, f"{name}={getattr(body, name)!r:.40} is not supported: {rule[1]}", param=name,
                           code="unsupported_parameter")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options",
                       code="invalid_value")


CONTENT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _messages(raw: list[dict[str, Any]]) -> list[dict[str, str]]:
    """OpenAI's messages → what a chat template takes: ``{"role", "content"}`` with text content (a list of text
    parts is joined with newlines; ``developer`` is the system role, as OpenAI treats it for other models)."""
    messages = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        role = message.get("role")
        if role in ("tool", "function"):
            raise APIError(400, f"{where}.role={role!r} is not supported: qkv serve does not call tools",
                           param=f"{where}.role", code="unsupported_parameter")
        if role not in CONTENT_ROLES:
            raise APIError(400, f"{where}.role must be one of system, developer, user, assistant (got {role!r:.40})",
                           param=f"{where}.role", code="invalid_value")
        for name in message:
            if name in ("tool_calls", "function_call", "audio") and message[name]:
                raise APIError(400, f"{where}.{name} is not supported: qkv serve does not call tools",
                               param=f"{where}.{name}", code="unsupported_parameter")
            if name not in ("role", "content", "name", "tool_calls", "function_call", "audio", "refusal"):
                raise APIError(400, f"unrecognized field {where}.{name}", param=f"{where}.{name}",
                               code="unknown_parameter")
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"{where}.content[{j}] must be a text part {{\"type\": \"text\", \"text\": "
                                        f"...}} (qkv serve reads text only; got type {kind!r:.30})",
                                   param=f"{where}.content[{j}]", code="unsupported_parameter"
                                   if kind not in (None, "text") else "invalid_value")
                texts.append(part["text"])
            content = "\n".join(texts)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise APIError(400, f"{where}.content must be a string or a list of text parts (got "
                                f"{type(content).__name__})", param=f"{where}.content", code="invalid_value")
        messages.append({"role": CONTENT_ROLES[role], "content": content})
    return messages


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if any(not s for s in stops):
        raise APIError(400, "stop must hold non-empty strings", param="stop", code="invalid_value")
    return stops


def model_id(served: Served) -> str:
    """The name /v1 gives the loaded model: its checkpoint's file or directory name (``SmolLM2-...gguf``)."""
    name = Path(served.source).name or served.source
    return re.sub(r"[^A-Za-z0-9._:-]+", "-", name).strip("-") or "qkv"


# -- the worker -----------------------------------------------------------------------------------------------------
_END = object()  # after the last item of a job


@dataclass(eq=False)
class Job:
    """One request for the worker: the prompt ids and how to continue them; what the worker yields for it goes to
    ``channel`` on the request's event loop (pieces, an exception, then ``_END``)."""

    served: Served
    ids: list[int]
    config: GenerationConfig
    stop_strings: tuple[str, ...]
    stop_token_ids: tuple[int, ...] | None
    generator: torch.Generator
    loop: asyncio.AbstractEventLoop
    channel: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    produced: int = 0  # tokens generated so far

    def put(self, item: Any) -> None:
        """From the worker thread: hand ``item`` to the request's coroutine."""
        try:
            self.loop.call_soon_threadsafe(self.channel.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody reads this job any more
            self.cancelled.set()


class QueueFull(Exception):
    pass


class Worker:
    """The one thread that runs the model for /v1, taking jobs in order from a queue of ``queue_size`` places
    (besides the job it runs). A job cancelled while it waits leaves the queue; one cancelled while it runs stops
    before its next token. The model's computation is shared with the explorer's requests through its lock."""

    def __init__(self, explorer: Explorer, queue_size: int = DEFAULT_QUEUE_SIZE):
        if not isinstance(queue_size, int) or isinstance(queue_size, bool) or queue_size < 0:
            raise ValueError(f"--queue-size={queue_size!r} must be an integer >= 0 (requests that may wait)")
        self.explorer, self.queue_size = explorer, queue_size
        self.cond = threading.Condition()
        self.waiting: deque[Job] = deque()
        self.current: Job | None = None
        self.closed = False
        self.thread: threading.Thread | None = None
        self._engine: tuple[Served, Any] | None = None  # the served model and its Conversation
        self.completed = 0
        self.finished: deque[Job] = deque(maxlen=16)  # the last jobs done (their counts, whether cancelled)

    def status(self) -> dict:
        with self.cond:
            return {"generating": self.current is not None, "waiting": len(self.waiting),
                    "queue_size": self.queue_size}

    def submit(self, job: Job) -> None:
        """Queue ``job``; raise QueueFull when ``queue_size`` jobs already wait behind a running one."""
        with self.cond:
            if self.closed:
                raise APIError(503, "the server is shutting down", code="shutting_down")
            if len(self.waiting) + (self.current is not None) > self.queue_size:
                raise QueueFull
            self.waiting.append(job)
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name="qkv-v1-worker", daemon=True)
                self.thread.start()
            self.cond.notify_all()

    def cancel(self, job: Job) -> None:
        """The client left: free its place, or stop its generation before the next token."""
        job.cancelled.set()
        with self.cond:
            if job in self.waiting:
                self.waiting.remove(job)
                self.cond.notify_all()

    def close(self, timeout: float = 10.0) -> None:
        with self.cond:
            self.closed = True
            for job in [*self.waiting, *([self.current] if self.current else [])]:
                job.cancelled.set()
            self.waiting.clear()
            self.cond.notify_all()
            thread = self.thread
        if thread is not None:
            thread.join(timeout)

    def idle(self, timeout: float = 10.0) -> bool:
        """Wait until no job runs or waits (for tests and benchmarks); whether it became idle in time."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.current is not None or self.waiting:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
        return True

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.waiting and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return
                job = self.current = self.waiting.popleft()
            try:
                if not job.cancelled.is_set():
                    self._run(job)
            finally:
                job.put(_END)
                with self.cond:
                    self.current = None
                    self.completed += 1
                    self.finished.append(job)
                    self.cond.notify_all()

    def conversation(self, served: Served) -> Any:
        """The Conversation that keeps ``served``'s cache between requests (a new one when the model changed)."""
        from ..generation.conversation import Conversation

        if self._engine is None or self._engine[0] is not served:
            self._engine = (served, Conversation(served.decoding, served.tokenizer))
        return self._engine[1]

    def _run(self, job: Job) -> None:
        lock = self.explorer.lock  # one model computation at a time, the explorer's included
        try:
            with lock:
                conversation = self.conversation(job.served)
            pieces = conversation.reply(job.ids, job.config, generator=job.generator,
                                        stop_strings=job.stop_strings, stop_token_ids=job.stop_token_ids)
        except Exception as err:  # noqa: BLE001 - the request's coroutine answers it
            job.put(err)
            return
        try:
            while not job.cancelled.is_set():
                with lock:
                    piece = next(pieces, None)
                if piece is None:
                    break
                job.produced += piece.token_id is not None
                job.put(piece)
        except Exception as err:  # noqa: BLE001
            job.put(err)
        finally:
            with lock:
                pieces.close()


# -- answers --------------------------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """A checked request: the prompt ids, the job's settings and what the answer says."""

    served: Served
    ids: list[int]
    config: GenerationConfig
    stop_strings: tuple[str, ...]
    stop_token_ids: tuple[int, ...] | None
    seed: int | None
    stream: bool
    include_usage: bool
    chat: bool


class OpenAIState:
    """What the /v1 routes share: the explorer (the loaded model), the worker, the chat template of the model."""

    def __init__(self, explorer: Explorer, queue_size: int = DEFAULT_QUEUE_SIZE):
        self.explorer = explorer
        self.worker = Worker(explorer, queue_size)
        self._template: tuple[Served, ChatTemplate] | None = None

    def served(self, model: str | None) -> Served:
        served = self.explorer.served
        if served is None:
            raise APIError(404, "no model is loaded; start qkv serve with --checkpoint PATH (or load one in the "
                                "explorer's page)", param="model", code="model_not_found")
        name = model_id(served)
        if model is not None and model not in (name, served.source):
            raise APIError(404, f"the model {model!r:.60} is not served here; this server serves {name!r} "
                                "(GET /v1/models)", param="model", code="model_not_found")
        kind = model_type_of(served.model)
        if kind != "decoder":
            article = "an" if kind[0] in "aeiou" else "a"  # an encoder, a seq2seq
            raise APIError(400, f"the loaded model is {article} {kind} model, which does not write "
                                "text; load a decoder (language model) checkpoint", param="model",
                           code="model_not_supported")
        return served

    def template(self, served: Served) -> ChatTemplate:
        if self._template is None or self._template[0] is not served:
            self._template = (served, ChatTemplate(served.tokenizer))
        return self._template[1]

    def prepare(self, body: _Sampling, chat: bool) -> Prepared:
        """Check a request and encode its prompt (in a thread: a chat template renders every prefix)."""
        from ..generation import GenerationConfig
        from ..generation.stopping import with_turn_ends

        _refuse_unsupported(body)
        served = self.served(body.model)
        tokenizer, core = served.tokenizer, unwrap(served.model)
        stop_strings = _stops(body.stop)
        if chat:
            template = self.template(served)
            try:
                ids = list(template.render(_messages(body.messages), add_generation_prompt=True).ids)
            except ChatTemplateError as err:
                raise APIError(400, _one_line(err), param="messages", code="invalid_value") from None
            stop_ids: tuple[int, ...] | None = None  # the conversation's own: eos, end of turn, plain format's
        else:
            ids = self._prompt_ids(body.prompt, tokenizer, core.config.vocab_size)
            stop_ids = with_turn_ends(GenerationConfig(), core.config.eos_token_id, tokenizer).stop_token_ids
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
        limit = core.config.max_seq_len
        room = limit - len(ids) + 1  # the last token is never fed back
        wanted = (body.max_completion_tokens if chat and body.max_completion_tokens is not None
                  else body.max_tokens)
        name = "max_completion_tokens" if chat and body.max_completion_tokens is not None else "max_tokens"
        if chat and None not in (body.max_tokens, body.max_completion_tokens) and \
                body.max_tokens != body.max_completion_tokens:
            raise APIError(400, f"max_tokens={body.max_tokens} and max_completion_tokens="
                                f"{body.max_completion_tokens} disagree; send one of them", param="max_tokens",
                           code="invalid_value")
        cap = self.explorer.max_new_tokens
        if wanted is not None and wanted > cap:
            raise APIError(400, f"{name}={wanted} is more than this server generates per request ({cap}); ask for "
                                f"at most {cap}, or start qkv serve with --max-new-tokens {wanted}", param=name,
                           code="invalid_value")
        if room < 1 or (wanted is not None and wanted > room):
            asked = f" + {name}={wanted}" if wanted is not None else ""
            raise APIError(400, f"the prompt's {len(ids)} tokens{asked} do not fit the model's context of {limit} "
                                "tokens; " + (f"ask for at most {room} new tokens or shorten the conversation"
                                              if room >= 1 else "shorten the conversation (drop its oldest turns)"),
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        if wanted is None:
            wanted = min(cap, room) if chat else min(COMPLETIONS_DEFAULT_MAX_TOKENS, cap, room)
        temperature = 1.0 if body.temperature is None else body.temperature  # OpenAI's default; 0 stays 0
        top_p = 1.0 if body.top_p is None else body.top_p
        if top_p == 0:  # the nucleus of probability 0 holds the most likely token alone
            temperature, top_p = 0.0, 1.0
        try:
            config = GenerationConfig(max_new_tokens=wanted, temperature=temperature, top_p=top_p)
        except OptionError as err:
            raise APIError(400, err.spelled(lambda n, v, only: n if only else f"{n}={v!r}"),
                           param=next(iter(err.options), None), code="invalid_value") from None
        options = body.stream_options
        return Prepared(served, ids, config, stop_strings, stop_ids, body.seed, bool(body.stream),
                        bool(options and options.include_usage), chat)

    @staticmethod
    def _prompt_ids(prompt: Any, tokenizer: Any, vocab_size: int) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
            if len(prompt) != 1:
                raise APIError(400, f"prompt holds {len(prompt)} prompts; qkv serve writes one completion per "
                                    "request: send one prompt", param="prompt", code="unsupported_parameter")
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, f"prompt holds {len(prompt)} prompts; qkv serve writes one completion per "
                                    "request: send one prompt", param="prompt", code="unsupported_parameter")
            prompt = prompt[0]
        if isinstance(prompt, list):  # token ids
            bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise APIError(400, f"prompt token {bad} is outside the vocabulary (0 to {vocab_size - 1})",
                               param="prompt", code="invalid_value")
            return list(prompt)
        try:
            return tokenizer.encode(prompt, add_special_tokens=True)
        except ValueError as err:
            raise APIError(400, _one_line(err), param="prompt", code="invalid_value") from None

    def job(self, prepared: Prepared) -> Job:
        device = next(unwrap(prepared.served.model).parameters()).device
        seed = prepared.seed if prepared.seed is not None else secrets.randbits(63)
        generator = torch.Generator(device).manual_seed(seed)  # the request's own: no other request draws from it
        return Job(prepared.served, prepared.ids, prepared.config, prepared.stop_strings, prepared.stop_token_ids,
                   generator, asyncio.get_running_loop())

    def submit(self, job: Job) -> None:
        try:
            self.worker.submit(job)
        except QueueFull:
            raise APIError(503, f"the server is busy: {self.worker.queue_size} requests already wait for the model; "
                                f"retry after {RETRY_AFTER_S} s (or start qkv serve with a larger --queue-size)",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None


def _usage(final: Any) -> dict:
    prompt, completion = int(final.prompt_tokens), int(final.completion_tokens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": int(final.reused_tokens)}}


async def _items(job: Job) -> AsyncIterator[Any]:
    """What the worker hands over for ``job``: pieces, until the end (an error is raised here)."""
    while True:
        item = await job.channel.get()
        if item is _END:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _Answer:
    """One answer's fixed fields (id, created, model) and its chunks, for chat or text completions."""

    def __init__(self, prepared: Prepared):
        self.chat = prepared.chat
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.model = model_id(prepared.served)

    def head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def whole(self, text: str, finish_reason: str, usage: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                      "logprobs": None, "finish_reason": finish_reason}
            return {**self.head("chat.completion"), "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self.head("text_completion"), "choices": [choice], "usage": usage}

    def chunk(self, text: str | None, finish_reason: str | None = None, *, first: bool = False) -> dict:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text or ""} if first else \
                ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**self.head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self.head("text_completion"), "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self.head(kind), "choices": [], "usage": usage}


def _sse(data: dict | str) -> str:
    """One Server-Sent Event: ``data: {compact json}`` (or ``data: [DONE]``) and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n"


class EventStream(StreamingResponse):
    """A StreamingResponse that calls ``on_close`` once the answer is over, sent or abandoned: Starlette stops
    the stream when the client leaves, and the worker must hear of it then, not when the generator is collected."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        # no-cache, not no-store: Chromium reports a streamed no-store fetch as aborted (see app.generate)
        super().__init__(content, media_type="text/event-stream; charset=utf-8",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _answer(request: Request, state: OpenAIState, body: _Sampling, chat: bool) -> Response:
    prepared = await run_in_threadpool(state.prepare, body, chat)
    job = state.job(prepared)
    state.submit(job)
    answer = _Answer(prepared)
    if prepared.stream:
        return EventStream(_stream(job, answer, prepared.include_usage), lambda: state.worker.cancel(job))
    collect = asyncio.ensure_future(_collect(job))
    left = asyncio.ensure_future(_until_disconnect(request.receive))
    try:
        await asyncio.wait({collect, left}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        left.cancel()
        if not collect.done():  # the client left (or this coroutine was cancelled): stop the generation
            state.worker.cancel(job)
            collect.cancel()
    if not collect.done() or collect.cancelled():
        return Response(status_code=499)  # nobody reads it
    text, final = collect.result()
    return JSONResponse(answer.whole(text, final.finish_reason, _usage(final)))


async def _collect(job: Job) -> tuple[str, Any]:
    texts, final = [], None
    try:
        async for piece in _items(job):
            texts.append(piece.text or "")
            if getattr(piece, "finish_reason", None) is not None:
                final = piece
    except (ValueError, TypeError) as err:
        raise APIError(400, _one_line(err)) from None
    if final is None:
        raise APIError(500, "the generation ended without its last piece; see the server's terminal",
                       type="server_error")
    return "".join(texts), final


async def _stream(job: Job, answer: _Answer, include_usage: bool) -> AsyncIterator[str]:
    yield _sse(answer.chunk("", first=True))
    final = None
    try:
        async for piece in _items(job):
            if piece.text:
                yield _sse(answer.chunk(piece.text))
            if getattr(piece, "finish_reason", None) is not None:
                final = piece
    except Exception as err:  # noqa: BLE001 - the status went out with the first chunk: the error is a chunk too
        error = err if isinstance(err, APIError) else APIError(400 if isinstance(err, (ValueError, TypeError))
                                                               else 500, _one_line(err))
        yield _sse(error.body())
        return
    if final is None:
        yield _sse(APIError(500, "the generation ended without its last piece", type="server_error").body())
        return
    yield _sse(answer.chunk(None, final.finish_reason))
    if include_usage:
        yield _sse(answer.usage_chunk(_usage(final)))
    yield _sse("[DONE]")


# -- routes ---------------------------------------------------------------------------------------------------------
def current_state(request: Request) -> OpenAIState:
    return request.app.state.openai


State = Annotated[OpenAIState, Depends(current_state)]


async def api_body(request: Request) -> dict[str, Any]:
    """The JSON object of a /v1 request (application/json, at most MAX_API_BODY_BYTES)."""
    return await read_json(request, MAX_API_BODY_BYTES)


Body = Annotated[dict[str, Any], Depends(api_body)]

router = APIRouter(prefix="/v1", dependencies=[Depends(require_token)])


@router.get("/models")
def models(state: State) -> Response:
    served = state.explorer.served
    data = [] if served is None else [{"id": model_id(served), "object": "model", "created": 0, "owned_by": "qkv"}]
    return JSONResponse({"object": "list", "data": data})


@router.get("/models/{name:path}")
def model(name: str, state: State) -> Response:
    served = state.served(name)
    return JSONResponse({"id": model_id(served), "object": "model", "created": 0, "owned_by": "qkv"})


@router.post("/chat/completions")
async def chat_completions(request: Request, state: State, payload: Body) -> Response:
    return await _answer(request, state, _parse(ChatRequest, payload), chat=True)


@router.post("/completions")
async def completions(request: Request, state: State, payload: Body) -> Response:
    return await _answer(request, state, _parse(CompletionRequest, payload), chat=False)


@router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
def no_route(path: str) -> Response:
    """After the key check, so that an unknown name says nothing to a caller without the key."""
    allowed = {"models": "GET", "chat/completions": "POST", "completions": "POST"}.get(path.strip("/"))
    if allowed is not None:
        raise StarletteHTTPException(405, headers={"Allow": allowed})
    raise StarletteHTTPException(404)


health = APIRouter()


@health.get("/health")
def health_check(state: State) -> Response:
    """Readiness, without the key: 200 once a model that writes text is loaded, else 503."""
    served = state.explorer.served
    ready = served is not None and model_type_of(served.model) == "decoder"
    body = {"status": "ok" if ready else "no model", "model": model_id(served) if served is not None else None,
            **state.worker.status()}
    return JSONResponse(body, 200 if ready else 503)


def refusal(path: str, message: str) -> dict:
    """The body of the explorer's 403 (Host, Origin) for ``path``: OpenAI's shape on /v1."""
    return error_body(message, "permission_error") if path.startswith(V1_PATHS) else {"error": message}


def _for_v1(handler: Callable) -> Callable:
    """An app's error handler that answers in OpenAI's shape for the /v1 paths and as before elsewhere."""
    async def answer(request: Request, err: Exception) -> Response:
        if request.url.path.startswith(V1_PATHS):
            return _as_api_error(request, err).response()
        return await handler(request, err) if asyncio.iscoroutinefunction(handler) else handler(request, err)
    return answer


def mount(app: FastAPI, explorer: Explorer, *, queue_size: int = DEFAULT_QUEUE_SIZE) -> OpenAIState:
    """Put ``/v1`` and ``/health`` on ``app`` (whose error handlers are set): its handlers answer errors on those
    paths in OpenAI's shape; ``APIError`` answers itself; FastAPI's 422 becomes OpenAI's 400."""
    state = app.state.openai = OpenAIState(explorer, queue_size)

    async def api_error(request: Request, err: APIError) -> Response:
        return err.response()

    async def unprocessable(request: Request, err: RequestValidationError) -> Response:
        return JSONResponse({"error": _message_of(err)}, HTTPStatus.UNPROCESSABLE_ENTITY)

    app.add_exception_handler(RequestValidationError, unprocessable)
    for kind, handler in list(app.exception_handlers.items()):
        app.exception_handlers[kind] = _for_v1(handler)
    app.add_exception_handler(APIError, api_error)
    app.include_router(health)
    app.include_router(router)
    return state


def _message_of(err: RequestValidationError) -> str:
    first = err.errors()[0] if err.errors() else {}
    return f"{_param(first.get('loc', ())) or 'the request'}: {first.get('msg', 'invalid')}"

