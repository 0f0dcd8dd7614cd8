"""The explorer as a FastAPI app, served by uvicorn: ``create_app(explorer, api_key=...)``.

Routes (the JSON API answers ``{"error": message}`` with a 4xx status for a bad request, never a stack trace):

- ``GET  /?token=TOKEN``                   the page; it keeps the token in ``sessionStorage`` and takes it out of
  the address bar (without one, the page asks for it; with a wrong one, a form asking again, status 401);
- ``GET  /static/{name}``                  the page's script and style (no token: they hold none, as Jupyter's);
- ``GET  /api/info``                       the loaded model, its limits, and checkpoints to pick from;
- ``POST /api/load      {checkpoint}``     load a qkv checkpoint or a pretrained (Hugging Face) directory;
- ``POST /api/attention {text, target?}``  every attention map of the text, with token labels;
- ``POST /api/explain   {text, layer, head, token, kind?, target?}``  one head's anatomy (``qkv.explain``);
- ``POST /api/chat/attention {messages, token_index?}``  a conversation's tokens (message, markup) and one
  query's attention row per layer and head (``qkv.serve.chat_attention``);
- ``GET  /api/generate?text=…&max_new_tokens=…&temperature=…``  a continuation streamed as Server-Sent Events,
  one event per piece of text as each token is chosen, then ``event: done`` ``{tokens, source}``.

Every answer about a model names the one that computed it (``source``: the attention, explain and load replies and
the generation's ``done`` event), which a ``/api/load`` running at the same time does not change.

Every ``/api`` call needs ``Authorization: Bearer TOKEN`` and every POST a JSON body; Host and Origin are checked for
every request (``qkv.serve.security``). The OpenAI-compatible routes (``/v1``, ``/health``: ``qkv.serve.openai``) take
the same locks by the same two lines: ``APIRouter(prefix="/v1", dependencies=[Depends(require_token)])``, then
``app.include_router``; their errors come in OpenAI's shape.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import openai
from .chat_attention import conversation_attention
from .explorer import STATIC_FILES, Explorer, GenerationRequest, RequestError
from .security import GuardMiddleware, Security, json_body, require_token

__all__ = ["create_app", "api", "pages"]

def current_explorer(request: Request) -> Explorer:
    return request.app.state.explorer


ExplorerDep = Annotated[Explorer, Depends(current_explorer)]
Payload = Annotated[dict[str, Any], Depends(json_body)]


def answer(data: dict, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """JSON as the explorer sends it: compact, and no NaN (ValueError, a 400, rather than invalid JSON)."""
    body = json.dumps(data, allow_nan=False, separators=(",", ":"))
    return Response(body, status, headers=headers, media_type="application/json")


# -- the page -------------------------------------------------------------------------------------------------------
pages = APIRouter()


def static_file(name: str, status: int = 200) -> Response:
    if name not in STATIC_FILES:
        raise RequestError(f"no file {name!r}", 404)
    body = resources.files("qkv.serve").joinpath("static", name).read_bytes()
    return Response(body, status, media_type=f"{STATIC_FILES[name]}; charset=utf-8")


@pages.get("/")
@pages.get("/index.html")
def index(request: Request, token: str | None = None) -> Response:
    """The page, opened with the token in its URL as Jupyter's (``qkv serve`` prints it): its script moves the token
    into ``sessionStorage`` and out of the address bar, so a reload comes here without one and finds it there (the
    page holds no data: every answer comes from the API, behind the token). A wrong token: a form asking again (401)."""
    if token is None or request.app.state.security.token_matches(token):
        return static_file("index.html")
    return static_file("token.html", 401)


@pages.get("/static/{name}")
def static(name: str) -> Response:
    return static_file(name)


# -- the JSON API -------------------------------------------------------------------------------------------------
api = APIRouter(prefix="/api", dependencies=[Depends(require_token)])


@api.get("/info")
def info(explorer: ExplorerDep) -> Response:
    return answer(explorer.info())


@api.post("/load")
def load(explorer: ExplorerDep, payload: Payload) -> Response:
    return answer(explorer.load(payload.get("checkpoint")))


@api.post("/attention")
def attention(explorer: ExplorerDep, payload: Payload) -> Response:
    return answer(explorer.attention(payload))


@api.post("/explain")
def explain(explorer: ExplorerDep, payload: Payload) -> Response:
    return answer(explorer.explain(payload))


@api.post("/chat/attention")
def chat_attention(explorer: ExplorerDep, payload: Payload) -> Response:
    return answer(conversation_attention(explorer, payload))


@api.get("/generate")
def generate(request: Request, explorer: ExplorerDep) -> Response:
    """Server-Sent Events: ``data: {"text"}`` per token, then ``event: done`` (or ``event: error``); a bad request
    is a 4xx before the stream starts."""
    checked = explorer.check_generation(dict(request.query_params))
    # no-cache, not no-store: Chromium reports a streamed no-store fetch as aborted even when it completed
    # (microsoft/playwright#42742); an event stream is never cached either way
    return StreamingResponse(events(explorer, checked), media_type="text/event-stream; charset=utf-8",
                             headers={"Cache-Control": "no-cache"})


def events(explorer: Explorer, checked: GenerationRequest) -> Iterator[str]:
    def event(data: dict, name: str | None = None) -> str:
        return (f"event: {name}\n" if name else "") + f"data: {json.dumps(data)}\n\n"

    count = 0
    try:
        for piece in explorer.generate(checked):
            yield event(piece)
            count += 1
    except Exception as err:  # the status went out with the first event: the error is an event too
        yield event({"error": _message(err)}, "error")
        return
    yield event({"tokens": count, "source": checked.served.source}, "done")


@api.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
def no_api(path: str) -> Response:
    """After the token check, so that an unknown API name says nothing to a caller without the token."""
    raise RequestError(f"no API at /api/{path}", 404)


# -- errors ---------------------------------------------------------------------------------------------------------
def _message(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _error_handlers(app: FastAPI) -> None:
    def client_error(status: int):
        async def handler(request: Request, err: Exception) -> Response:
            return answer({"error": _message(err)}, getattr(err, "status", status))
        return handler

    async def http_error(request: Request, err: StarletteHTTPException) -> Response:
        message = err.detail if err.status_code != 404 else f"no page at {request.url.path}"
        return answer({"error": str(message)}, err.status_code, err.headers)

    async def server_error(request: Request, err: Exception) -> Response:  # uvicorn logs the traceback
        return answer({"error": f"the server could not answer ({type(err).__name__}); see its terminal"}, 500)

    app.add_exception_handler(RequestError, client_error(400))
    app.add_exception_handler(FileNotFoundError, client_error(404))
    for kind in (ValueError, TypeError, NotADirectoryError):
        app.add_exception_handler(kind, client_error(400))
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, server_error)


def create_app(explorer: Explorer, *, api_key: str, allowed_hosts: Iterable[str] = (),
               allowed_origins: Iterable[str] = (), queue_size: int = openai.DEFAULT_QUEUE_SIZE) -> FastAPI:
    """The explorer's web app: the page, its static files and the ``/api`` routes, and the OpenAI-compatible
    ``/v1`` routes (one model worker, ``queue_size`` requests waiting at most), behind ``api_key``; requests must
    name an allowed Host (loopback names plus ``allowed_hosts``) and come from no other site's page (but the
    ``allowed_origins``, on ``/v1``). Raises ValueError for an empty key or an entry that is not a host name or
    an origin."""
    security = Security.create(api_key, allowed_hosts, allowed_origins)
    app = FastAPI(title="qkv explorer", docs_url=None, redoc_url=None, openapi_url=None)  # no CDN pages
    app.state.explorer, app.state.security = explorer, security
    app.add_middleware(GuardMiddleware, security=security, refusal=openai.refusal)
    _error_handlers(app)
    app.include_router(pages)
    app.include_router(api)
    openai.mount(app, explorer, queue_size=queue_size)
    return app
