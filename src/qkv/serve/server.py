"""Run the explorer's app with uvicorn on a socket bound first, so that ``--port 0`` can be printed before serving
and a test can start it in a thread: ``with make_server(explorer) as server: ... server.url``."""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Iterable

import uvicorn

from .app import create_app
from .explorer import Explorer
from .openai import DEFAULT_QUEUE_SIZE
from .security import TokenRedactor, new_token

__all__ = ["ExplorerServer", "make_server", "serve", "url_host"]


def url_host(host: str) -> str:
    """The host as a URL names it: a wildcard address → 127.0.0.1 (the browser on this machine), IPv6 in []."""
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


class ExplorerServer:
    """uvicorn serving ``create_app(explorer)`` on ``host:port`` (port 0: a free one, read ``server_address``).

    ``serve_forever()`` blocks; ``start()`` serves from a thread, ``shutdown()`` stops and ``server_close()`` frees
    the socket (both done on leaving a ``with`` block). ``url`` is the page's address with its token."""

    def __init__(self, explorer: Explorer, host: str = "127.0.0.1", port: int = 0, *, api_key: str | None = None,
                 allowed_hosts: Iterable[str] = (), allowed_origins: Iterable[str] = (),
                 queue_size: int = DEFAULT_QUEUE_SIZE, verbose: bool = False):
        self.api_key = api_key if api_key is not None else new_token()
        bound = [host] if host not in ("0.0.0.0", "::", "") else []  # the bound address answers to its own name
        self.app = create_app(explorer, api_key=self.api_key, allowed_hosts=[*bound, *allowed_hosts],
                              allowed_origins=allowed_origins, queue_size=queue_size)
        try:
            family = socket.AF_INET6 if isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address) else \
                socket.AF_INET
        except ValueError:  # a name such as localhost
            family = socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind((host, port))
            self.socket.listen(128)  # from now on connections queue, before uvicorn's loop runs
        except OSError:
            self.socket.close()
            raise
        # warnings only; with verbose, one access line per request (uvicorn's "running on" would show no token),
        # its token parameters redacted: the URL printed at start holds the token, and the page is opened with it
        config = uvicorn.Config(self.app, log_level="warning", access_log=verbose, lifespan="off",
                                timeout_graceful_shutdown=3, server_header=False)
        if verbose:
            logging.getLogger("uvicorn.access").setLevel(logging.INFO)
        self.redactor = TokenRedactor(self.app.state.security.api_key).attach()
        self.uvicorn = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def server_address(self) -> tuple[str, int]:
        return self.socket.getsockname()[:2]

    @property
    def url(self) -> str:
        """``http://HOST:PORT/?token=TOKEN``: the page, as the browser should open it."""
        host, port = self.server_address
        return f"http://{url_host(host)}:{port}/?token={self.api_key}"

    @property
    def api_base(self) -> str:
        """``http://HOST:PORT/v1``: the OpenAI-compatible API's base URL (the openai client's ``base_url``)."""
        host, port = self.server_address
        return f"http://{url_host(host)}:{port}/v1"

    def serve_forever(self) -> None:
        """Serve until ``shutdown()`` (or Ctrl-C / SIGTERM when called from the main thread)."""
        self.uvicorn.run(sockets=[self.socket])

    def start(self, timeout: float = 30.0) -> ExplorerServer:
        """Serve from a daemon thread; return once uvicorn answers."""
        self._thread = threading.Thread(target=self.serve_forever, name="qkv-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the explorer's server did not start; see the messages above")
            time.sleep(0.01)
        return self

    def shutdown(self) -> None:
        self.uvicorn.should_exit = True
        self.app.state.openai.worker.close()  # stops a generation under way at its next token
        if self._thread is not None:
            self._thread.join(timeout=30)

    def server_close(self) -> None:
        self.socket.close()
        self.redactor.detach()

    def __enter__(self) -> ExplorerServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


def make_server(explorer: Explorer, host: str = "127.0.0.1", port: int = 0, *, api_key: str | None = None,
                allowed_hosts: Iterable[str] = (), allowed_origins: Iterable[str] = (),
                queue_size: int = DEFAULT_QUEUE_SIZE, verbose: bool = False) -> ExplorerServer:
    """The explorer's server bound to ``host:port`` and not yet serving (``api_key`` None: a random token)."""
    return ExplorerServer(explorer, host, port, api_key=api_key, allowed_hosts=allowed_hosts,
                          allowed_origins=allowed_origins, queue_size=queue_size, verbose=verbose)


def serve(explorer: Explorer, host: str = "127.0.0.1", port: int = 8008, *, api_key: str | None = None,
          allowed_hosts: Iterable[str] = (), allowed_origins: Iterable[str] = (),
          queue_size: int = DEFAULT_QUEUE_SIZE, verbose: bool = True) -> None:
    """Serve until interrupted, after printing the page's URL with its token and the OpenAI API's base URL."""
    server = make_server(explorer, host, port, api_key=api_key, allowed_hosts=allowed_hosts,
                         allowed_origins=allowed_origins, queue_size=queue_size, verbose=verbose)
    print(f"qkv explorer on {server.url}  (Ctrl-C stops it)", flush=True)
    print(f"OpenAI-compatible API on {server.api_base}  (its key: the token in the URL above)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.app.state.openai.worker.close()
        server.server_close()
