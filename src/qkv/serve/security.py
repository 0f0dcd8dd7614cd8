"""The locks on ``qkv serve``, as Jupyter puts them on its own server: a local web server is reachable by every page
open in the user's browser, so it trusts none of them.

- **A token** (``--api-key``, ``QKV_API_KEY``, or a random one printed in the URL at start): every API call sends
  ``Authorization: Bearer TOKEN``, the header OpenAI clients send (``require_token``, a FastAPI dependency that any
  router can take, ``/api`` today and ``/v1`` later). The page reads it from its own URL (``/?token=…``) once,
  keeps it in ``sessionStorage`` and takes it out of the address bar.
- **No token in a log line** (``TokenRedactor``): the server's access log writes ``token=[redacted]`` for any
  token a URL carries, right or wrong, and never the key itself, wherever it appears in a line.
- **A Host allow-list** (localhost, 127.0.0.1, [::1], the address bound, plus ``--allowed-hosts``): a page that
  rebinds its own DNS name to 127.0.0.1 (DNS rebinding) sends its own name as Host, and is refused.
- **No cross-site Origin**: a browser names the page that sent a request in ``Origin``; only the explorer's own page
  may call it. Requests without an Origin (curl, Python, OpenAI clients) pass to the token check. Origins listed in
  ``--allowed-origins`` may call the OpenAI-compatible paths (``/v1``, ``/health``; the page's ``/api`` stays its
  own): they get CORS headers there, preflights included, and still need the token.
- **JSON bodies only** (``json_body``): ``Content-Type: application/json`` cannot be sent cross-site without a CORS
  preflight, which the Origin check refuses; the "simple" text/plain or form POST a page can send is answered 415.

Host and Origin are checked for every request (``GuardMiddleware``), page and static files included; the token and
the content type by the routes that need them. Refusals are ``{"error": message}`` with the status: 400, 401, 403,
413 or 415.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, quote_plus

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["LOOPBACK_HOSTS", "MAX_BODY_BYTES", "HEADERS", "CORS_PATHS", "Security", "GuardMiddleware",
           "TokenRedactor", "host_name", "origin_name", "new_token", "require_token", "json_body", "read_json"]

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
MAX_BODY_BYTES = 64 * 1024
# on every answer: never cached, never sniffed as another type, never framed by another page (clickjacking), never
# a Referer (the page's URL holds the token); the page talks to no other server and sends its forms nowhere else
HEADERS = {
    "cache-control": "no-store", "x-content-type-options": "nosniff", "referrer-policy": "no-referrer",
    "content-security-policy": "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
                               "object-src 'none'",
}
CORS_PATHS = ("/v1", "/health")  # what pages on --allowed-origins may call
TOKEN_HINT = "open the URL `qkv serve` printed (it ends in ?token=…), or send the header Authorization: Bearer TOKEN"


def new_token() -> str:
    """A random token of 48 hex digits (192 bits), as Jupyter's."""
    return secrets.token_hex(24)


def host_name(host: str) -> str | None:
    """The name in a Host header or an ``--allowed-hosts`` entry, lower case, without port or IPv6 brackets:
    ``"LocalHost:8008"`` → ``"localhost"``, ``"[::1]:8008"`` → ``"::1"``; None when it is not a host name."""
    host = host.strip().lower()
    if host.startswith("["):  # [v6] or [v6]:port
        end = host.find("]")
        if end < 0 or (host[end + 1:] and not host[end + 1:].startswith(":")):
            return None
        name = host[1:end]
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            return None
        return name
    if host.count(":") > 1:  # a bare IPv6 address (an --allowed-hosts entry)
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            return None
    name, _, port = host.partition(":")
    if port and not port.isdigit():
        return None
    name = name.rstrip(".")
    if not name or any(not (c.isalnum() or c in "-._") for c in name):
        return None
    return name


def origin_name(origin: str) -> str | None:
    """A browser's ``Origin`` (or an ``--allowed-origins`` entry) as ``scheme://host[:port]``, lower case, without
    a trailing slash; None when it is not one (a path, another scheme, no host)."""
    scheme, sep, rest = origin.strip().lower().rstrip("/").partition("://")
    if not sep or scheme not in ("http", "https") or not rest or "/" in rest or host_name(rest) is None:
        return None
    return f"{scheme}://{rest}"


@dataclass(frozen=True)
class Security:
    """The explorer's token, the Host names it answers to and the other sites' origins it admits on ``CORS_PATHS``."""

    api_key: str
    allowed_hosts: frozenset[str]
    allowed_origins: frozenset[str] = frozenset()

    @classmethod
    def create(cls, api_key: str, allowed_hosts: Iterable[str] = (), allowed_origins: Iterable[str] = ()
               ) -> Security:
        """Check the token, the extra host names (``--allowed-hosts``; loopback names are always allowed) and the
        origins (``--allowed-origins``, ``http://host:port``). Raises ValueError for an empty token or an entry
        that is not a host name or an origin."""
        if not isinstance(api_key, str) or not api_key.strip():
            raise ValueError("the API key is empty; pass --api-key KEY (or set QKV_API_KEY), or leave both unset "
                             "for a random one")
        names = set(LOOPBACK_HOSTS)
        for entry in allowed_hosts:
            name = host_name(entry)
            if name is None:
                raise ValueError(f"--allowed-hosts entry {entry!r} is not a host name; list names or addresses "
                                 "such as mybox.lan,192.168.1.20")
            names.add(name)
        origins = set()
        for entry in allowed_origins:
            origin = origin_name(entry)
            if origin is None:
                raise ValueError(f"--allowed-origins entry {entry!r} is not an origin; list them as a browser "
                                 "names them, scheme://host[:port], such as http://localhost:3000")
            origins.add(origin)
        return cls(api_key.strip(), frozenset(names), frozenset(origins))

    def token_matches(self, candidate: str | None) -> bool:
        """Constant-time comparison with the token."""
        return isinstance(candidate, str) and hmac.compare_digest(candidate.encode(), self.api_key.encode())

    def host_allowed(self, host: str | None) -> bool:
        name = host_name(host) if host else None
        return name is not None and name in self.allowed_hosts

    @staticmethod
    def same_origin(origin: str, host: str) -> bool:
        """Whether a browser's ``Origin`` is the page served from ``host`` (scheme://Host, the port included)."""
        scheme, _, rest = origin.strip().lower().partition("://")
        return scheme in ("http", "https") and rest == host.strip().lower()

    def origin_allowed(self, origin: str, path: str) -> bool:
        """Whether a page on another site, ``origin``, may call ``path`` (listed in ``--allowed-origins``, and a
        path under ``CORS_PATHS``)."""
        return origin_name(origin) in self.allowed_origins and path.startswith(CORS_PATHS)


class GuardMiddleware:
    """Refuse, before any route runs, a request whose Host is not allowed (403: DNS rebinding) or whose Origin is
    another site (403) that ``--allowed-origins`` does not admit on this path; add ``HEADERS`` to every answer (a
    header the route set, e.g. Cache-Control, stays), and CORS headers for an admitted origin (whose preflight
    this answers itself). ``refusal(path, message)``: the JSON body of a refusal (default ``{"error": message}``)."""

    def __init__(self, app: ASGIApp, security: Security,
                 refusal: Callable[[str, str], dict] = lambda path, message: {"error": message}):
        self.app, self.security, self.refusal = app, security, refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host, origin = headers.get("host", ""), headers.get("origin")
        message = None
        if not self.security.host_allowed(host):
            message = (f"Host {host!r} is not one this explorer answers to; browse to http://127.0.0.1 or "
                       "localhost, or start qkv serve with --allowed-hosts NAME")
        elif origin is not None and not self.security.same_origin(origin, host):
            if self.security.origin_allowed(origin, scope["path"]):
                return await self._cross_origin(scope, receive, send, origin, headers)
            message = (f"a page from {origin} may not call this explorer; only its own page (http://{host}) "
                       "may: open the URL `qkv serve` printed, or start qkv serve with --allowed-origins "
                       f"{origin} (for the /v1 API)")
        if message is None:
            return await self.app(scope, receive, lambda event: send(_with_headers(event)))
        await JSONResponse(self.refusal(scope["path"], message), 403)(
            scope, receive, lambda event: send(_with_headers(event)))

    async def _cross_origin(self, scope: Scope, receive: Receive, send: Send, origin: str,
                            headers: dict[str, str]) -> None:
        """A page on an admitted origin: its preflight answered here, its requests with CORS headers."""
        cors = {"access-control-allow-origin": origin, "vary": "Origin",
                "access-control-expose-headers": "Retry-After"}
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            # the headers it asks for are echoed: the token is still checked on the request itself
            asked = headers.get("access-control-request-headers", "authorization, content-type")
            cors.update({"access-control-allow-methods": "GET, POST, OPTIONS",
                         "access-control-allow-headers": asked, "access-control-max-age": "600"})
            return await Response(status_code=204, headers=cors)(
                scope, receive, lambda event: send(_with_headers(event)))
        await self.app(scope, receive, lambda event: send(_with_headers(event, cors)))


def _with_headers(event: dict, extra: dict[str, str] | None = None) -> dict:
    if event["type"] == "http.response.start":
        present = {k.lower() for k, _ in event["headers"]}
        added = {**HEADERS, **(extra or {})}
        event["headers"] = [*event["headers"], *((k.encode(), v.encode()) for k, v in added.items()
                                                 if k.encode() not in present)]
    return event


# query parameters that carry a credential, whichever server or client sent them
SECRET_PARAMETER = re.compile(r"(?i)([?&;](?:token|access_token|api_key|apikey|key)=)[^&;#\s\"]*")
REDACTED = "[redacted]"


class TokenRedactor(logging.Filter):
    """A logging filter that takes tokens out of a server's log lines: the value of every ``token=`` (and
    ``access_token``, ``api_key``, ``key``) query parameter, and the API key itself wherever it appears (plain or
    URL-quoted). ``attach()`` puts it on uvicorn's loggers (the access log writes each request's path with its query
    string); ``detach()`` takes it off."""

    LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")

    def __init__(self, api_key: str):
        super().__init__()
        # the key itself, where a line holds it outside a token parameter; a key of a few characters would take
        # every such run of letters out of the log, and is guessed faster than read there
        forms = {api_key, quote(api_key, safe=""), quote_plus(api_key)} if len(api_key) >= 8 else set()
        self.secrets = sorted(forms, key=len, reverse=True)

    def redact(self, text: str) -> str:
        text = SECRET_PARAMETER.sub(lambda m: m.group(1) + REDACTED, text)
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = self.redact(record.msg)
        if isinstance(record.args, tuple):  # uvicorn's access formatter unpacks its five arguments: keep the shape
            record.args = tuple(self.redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: self.redact(v) if isinstance(v, str) else v for k, v in record.args.items()}
        return True

    def attach(self) -> TokenRedactor:
        for name in self.LOGGERS:
            logging.getLogger(name).addFilter(self)
        return self

    def detach(self) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeFilter(self)


def security_of(request: Request) -> Security:
    return request.app.state.security


def require_token(request: Request) -> None:
    """FastAPI dependency: the request carries ``Authorization: Bearer TOKEN`` with the explorer's token, or is
    answered 401. Put it on a router (``APIRouter(dependencies=[Depends(require_token)])``) to lock all its routes."""
    scheme, _, candidate = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not security_of(request).token_matches(candidate.strip()):
        problem = "a wrong token" if scheme.lower() == "bearer" else "no token"
        raise HTTPException(401, f"this API needs the explorer's token and got {problem}: {TOKEN_HINT}",
                            headers={"WWW-Authenticate": "Bearer"})


async def json_body(request: Request) -> dict[str, Any]:
    """FastAPI dependency: the request's body as a JSON object. 415 unless ``Content-Type: application/json``;
    413 beyond MAX_BODY_BYTES; 400 for a body that is not a JSON object. An empty body is ``{}``."""
    return await read_json(request, MAX_BODY_BYTES)


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """:func:`json_body` with a limit of ``limit`` bytes."""
    kind = request.headers.get("content-type", "")
    if kind.split(";")[0].strip().lower() != "application/json":
        raise HTTPException(415, f"the request body must be JSON sent with Content-Type: application/json "
                                 f"(got {kind.split(';')[0].strip() or 'no Content-Type'})")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body of {declared} bytes is larger than {limit}")
    raw = b""
    try:
        async for part in request.stream():
            raw += part
            if len(raw) > limit:
                raise HTTPException(413, f"request body is larger than {limit} bytes")
    except ClientDisconnect:  # nobody reads the answer; the terminal shows no traceback
        raise HTTPException(400, "the client left before its request body arrived") from None
    try:
        payload = json.loads(raw or b"{}")
    except ValueError:
        raise HTTPException(400, "the request body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise HTTPException(400, "the request body must be a JSON object")
    return payload
