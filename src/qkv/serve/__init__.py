"""``qkv serve``: the attention explorer on the web, a FastAPI app served by uvicorn (the ``serve`` extra), locked as
Jupyter locks its own server: a token on every API call, a Host allow-list, no cross-site Origin, JSON-only POSTs.

- ``qkv.serve.app``: ``create_app(explorer, api_key=...)``, the page and the ``/api`` routes;
- ``qkv.serve.security``: the token, Host and Origin checks (``require_token``: the dependency a router takes);
- ``qkv.serve.server``: ``make_server`` / ``serve``, uvicorn on a socket bound first.

What the page asks is answered by ``qkv.serve.explorer.Explorer`` (re-exported here with the names that lived in
``qkv.viz.server`` before the explorer moved onto FastAPI).
"""

from .app import create_app
from .explorer import STATIC_FILES, Explorer, GenerationRequest, RequestError, Served, find_checkpoints
from .security import Security, json_body, new_token, require_token
from .server import ExplorerServer, make_server, serve

__all__ = [
    "create_app",
    "make_server",
    "serve",
    "ExplorerServer",
    "Security",
    "require_token",
    "json_body",
    "new_token",
    "Explorer",
    "Served",
    "GenerationRequest",
    "RequestError",
    "find_checkpoints",
    "STATIC_FILES",
]
