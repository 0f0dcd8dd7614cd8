"""``qkv serve``: the attention explorer in the browser and an OpenAI-compatible API (``/v1``), served by qkv itself
on this machine, behind a token."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from qkv.extras import needs

from .options import add_checkpoint, add_compile, add_quantize, add_threads, use_threads


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="the attention explorer (a local web page) and an OpenAI-compatible API",
                       description="Serve the attention explorer: type a sentence and see each head's attention as "
                                   "lines and heatmaps, one head's arithmetic, and generated text streaming in. "
                                   "Works offline: every script and style is served by qkv. Open the URL it prints: "
                                   "it holds the token that every API call needs (Authorization: Bearer TOKEN). "
                                   "The same server answers OpenAI clients at /v1 (/v1/models, /v1/chat/completions, "
                                   "/v1/completions; the token is their API key) and /health.")
    add_checkpoint(p, required=False, help="the model to open with (another can be picked in the page)")
    add_quantize(p)  # every model the server loads, the first and those picked in the page
    add_compile(p)  # /v1 and the page's generation decode through a compiled step
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; anything else exposes the model "
                        "and the file paths it can load to the network)")
    p.add_argument("--port", type=int, default=8008, help="port (default 8008; 0 picks a free one)")
    p.add_argument("--api-key", metavar="KEY", default=None,
                   help="the token every API call must send as 'Authorization: Bearer KEY' (default: $QKV_API_KEY, "
                        "else a random one, printed in the URL at start)")
    p.add_argument("--allowed-hosts", metavar="NAME[,NAME]", action="append", default=[],
                   help="host names or addresses the explorer also answers to, besides localhost, 127.0.0.1 and "
                        "[::1] (needed with --host 0.0.0.0 for other machines' browsers; it refuses other Host "
                        "headers against DNS rebinding)")
    p.add_argument("--root", default=".", metavar="DIR",
                   help="directory searched for checkpoints to offer in the page (default: the current one)")
    p.add_argument("--allowed-origins", metavar="ORIGIN[,ORIGIN]", action="append", default=[],
                   help="web pages on other origins (scheme://host:port, e.g. http://localhost:3000) that may call "
                        "the /v1 API from a browser (CORS; they still need the token); no other site may")
    p.add_argument("--queue-size", type=int, default=16,
                   help="requests to /v1 that may wait while the model answers another (default 16); past that "
                        "the server answers 503 with Retry-After")
    add_threads(p, help="CPU threads for torch (default: torch's choice; on a busy machine 1 answers a small "
                        "model faster)")
    p.add_argument("--max-new-tokens", type=int, default=200,
                   help="the most tokens one request may generate (the explorer's and /v1's max_tokens)")
    p.add_argument("--max-text-chars", type=int, default=2000, help="the longest text a request may send")
    p.add_argument("--max-drawn-tokens", type=int, default=128,
                   help="the most tokens whose attention the page draws (every head's map is sent; default 128)")
    # gone: it once set the drawing cap, and max_tokens is OpenAI's count of new tokens per request
    p.add_argument("--max-tokens", dest="gone_max_tokens", help=argparse.SUPPRESS)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with needs("qkv serve"):
        from qkv.serve import Explorer, serve

    if args.gone_max_tokens is not None:
        raise ValueError("--max-tokens is gone: the tokens the page draws are --max-drawn-tokens, and max_tokens is "
                         "what each /v1 request asks for (at most --max-new-tokens)")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port={args.port} is not a port number; use 1 to 65535 (or 0 for any free port)")
    for name in ("max_new_tokens", "max_text_chars", "max_drawn_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")
    if args.queue_size < 0:
        raise ValueError(f"--queue-size={args.queue_size} must be at least 0 (requests that may wait)")
    use_threads(args.threads)
    api_key = args.api_key if args.api_key is not None else os.environ.get("QKV_API_KEY")  # checked by qkv.serve
    allowed_hosts = [name.strip() for entry in args.allowed_hosts for name in entry.split(",") if name.strip()]
    allowed_origins = [name.strip() for entry in args.allowed_origins for name in entry.split(",") if name.strip()]
    explorer = Explorer(checkpoint=args.checkpoint, search_root=args.root, max_new_tokens=args.max_new_tokens,
                        max_text_chars=args.max_text_chars, max_drawn_tokens=args.max_drawn_tokens,
                        quantize=args.quantize, compile="inductor" if args.compile else None)
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        print(f"qkv serve: warning: binding {args.host} makes the explorer reachable from other machines "
              "(they still need the token)", file=sys.stderr)
        if args.host in ("0.0.0.0", "::") and not allowed_hosts:
            print("qkv serve: warning: only requests naming localhost, 127.0.0.1 or [::1] are answered; list the "
                  "names other machines use for this one with --allowed-hosts", file=sys.stderr)
    try:
        serve(explorer, args.host, args.port, api_key=api_key, allowed_hosts=allowed_hosts,
              allowed_origins=allowed_origins, queue_size=args.queue_size)  # prints the URL
    except OSError as err:
        raise ValueError(f"cannot listen on {args.host}:{args.port} ({err.strerror}); pick another --port") from None
    except KeyboardInterrupt:
        print("qkv serve: stopped", file=sys.stderr)
    return 0
