"""``qkv serve``: the attention explorer in the browser, served by qkv itself on this machine, behind a token."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from qkv.extras import needs

from .options import add_checkpoint


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="the attention explorer: a local web page (lines, heatmaps, explain, generate)",
                       description="Serve the attention explorer: type a sentence and see each head's attention as "
                                   "lines and heatmaps, one head's arithmetic, and generated text streaming in. "
                                   "Works offline: every script and style is served by qkv. Open the URL it prints: "
                                   "it holds the token that every API call needs (Authorization: Bearer TOKEN).")
    add_checkpoint(p, required=False, help="the model to open with (another can be picked in the page)")
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
    p.add_argument("--max-new-tokens", type=int, default=200, help="the most tokens one request may generate")
    p.add_argument("--max-text-chars", type=int, default=2000, help="the longest text a request may send")
    p.add_argument("--max-drawn-tokens", type=int, default=128,
                   help="the most tokens whose attention the page draws (every head's map is sent; default 128)")
    # its name before the explorer's cap stopped sharing a name with the OpenAI API's max_tokens: still accepted
    p.add_argument("--max-tokens", type=int, dest="max_drawn_tokens", help=argparse.SUPPRESS)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with needs("qkv serve"):
        from qkv.serve import Explorer, serve

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port={args.port} is not a port number; use 1 to 65535 (or 0 for any free port)")
    for name in ("max_new_tokens", "max_text_chars", "max_drawn_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")
    api_key = args.api_key if args.api_key is not None else os.environ.get("QKV_API_KEY")  # checked by qkv.serve
    allowed_hosts = [name.strip() for entry in args.allowed_hosts for name in entry.split(",") if name.strip()]
    explorer = Explorer(checkpoint=args.checkpoint, search_root=args.root, max_new_tokens=args.max_new_tokens,
                        max_text_chars=args.max_text_chars, max_drawn_tokens=args.max_drawn_tokens)
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
        serve(explorer, args.host, args.port, api_key=api_key, allowed_hosts=allowed_hosts)  # prints the URL
    except OSError as err:
        raise ValueError(f"cannot listen on {args.host}:{args.port} ({err.strerror}); pick another --port") from None
    except KeyboardInterrupt:
        print("qkv serve: stopped", file=sys.stderr)
    return 0
