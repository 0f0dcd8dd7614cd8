"""``qkv serve``: the attention explorer in the browser, served by qkv itself on this machine."""

from __future__ import annotations

import argparse
import ipaddress
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="the attention explorer: a local web page (lines, heatmaps, explain, generate)",
                       description="Serve the attention explorer: type a sentence and see each head's attention as "
                                   "lines and heatmaps, one head's arithmetic, and generated text streaming in. "
                                   "Works offline: every script and style is served by qkv.")
    p.add_argument("--checkpoint", metavar="DIR", help="the model to open with (another can be picked in the page)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; anything else exposes the model "
                        "and the file paths it can load to the network)")
    p.add_argument("--port", type=int, default=8008, help="port (default 8008; 0 picks a free one)")
    p.add_argument("--root", default=".", metavar="DIR",
                   help="directory searched for checkpoints to offer in the page (default: the current one)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="the most tokens one request may generate")
    p.add_argument("--max-text-chars", type=int, default=2000, help="the longest text a request may send")
    p.add_argument("--max-tokens", type=int, default=128,
                   help="the most tokens whose attention the page draws (every head's map is sent; default 128)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from qkv.viz.server import Explorer, make_server

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port={args.port} is not a port number; use 1 to 65535 (or 0 for any free port)")
    for name in ("max_new_tokens", "max_text_chars", "max_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")
    explorer = Explorer(checkpoint=args.checkpoint, search_root=args.root, max_new_tokens=args.max_new_tokens,
                        max_text_chars=args.max_text_chars, max_tokens=args.max_tokens)
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        print(f"qkv serve: warning: binding {args.host} makes the explorer reachable from other machines",
              file=sys.stderr)
    try:
        server = make_server(explorer, args.host, args.port, verbose=True)
    except OSError as err:
        raise ValueError(f"cannot listen on {args.host}:{args.port} ({err.strerror}); pick another --port") from None
    host, port = server.server_address[:2]
    print(f"qkv explorer on http://{host}:{port}/  (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("qkv serve: stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0
