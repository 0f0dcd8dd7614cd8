"""``qkv explain --checkpoint DIR "text" --layer L --head H --token I``: one head's arithmetic, step by step."""

from __future__ import annotations

import argparse
import json
import math

from qkv.extras import require

from .options import add_checkpoint, add_quantize, first_line, load_checkpoint, query_token


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain", help="the anatomy of one attention head for one query token, with the model's numbers",
        description="Recompute one head for one query token as the explanations teach it: the query vector, "
                    "each key, q·k, divided by sqrt(d_k), the softmax weights (summing to 1), each value scaled "
                    "by its weight, and their sum, which is checked against the head's output in the model's "
                    "own forward pass.",
    )
    add_checkpoint(p)
    add_quantize(p)
    p.add_argument("text", nargs="?", help="the text (default: the first line of stdin)")
    p.add_argument("--layer", type=int, required=True, help="the layer (0-based; negative counts from the end)")
    p.add_argument("--head", type=int, required=True, help="the head (0-based; negative counts from the end)")
    p.add_argument("--token", required=True,
                   help="the query token: its index (0-based, negative from the end) or its text, e.g. 'it'")
    p.add_argument("--kind", choices=["encoder", "decoder_self", "cross"],
                   help="encoder-decoder only: which attention (default: encoder)")
    p.add_argument("--target", help="encoder-decoder only: the decoder's text (default: the model's own translation)")
    p.add_argument("--dims", type=int, default=4, help="vector entries shown (default 4; 0 = all)")
    p.add_argument("--json", action="store_true", help="print every number as JSON instead of a table")
    p.set_defaults(run=run)


def _vector(values, dims: int) -> str:
    shown = values if dims <= 0 else values[:dims]
    more = ", …" if 0 < dims < len(values) else ""
    return "[" + ", ".join(f"{x:+.3f}" for x in shown) + more + "]"


def run(args: argparse.Namespace) -> int:
    from qkv.explain import TOLERANCE, explain_head
    from qkv.viz import attention_kinds, encode_input

    if args.dims < 0:
        raise ValueError(f"--dims={args.dims} must be >= 0 (0 shows every entry)")
    text = first_line(args.text)
    model, tokenizer = load_checkpoint(args.checkpoint, quantize=args.quantize)
    kind = args.kind or attention_kinds(model)[0]
    queries, _ = encode_input(model, tokenizer, text, args.target).labels_for(kind)
    token = query_token(queries, args.token)
    e = explain_head(model, tokenizer, text, layer=args.layer, head=args.head, token=token, kind=kind,
                     target=args.target)
    if args.json:
        print(json.dumps(e.to_dict()))
        return 0 if e.matches_model else 1

    Console = require("rich.console", "the explain table", "pass --json").Console
    Table = require("rich.table", "the explain table", "pass --json").Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # piped output: keep each table row on one line
    console.print(f"[bold]{kind}[/] attention, layer {e.layer}, head {e.head}, query token {e.token} "
                  f"{e.query_label!r}: d_k = {e.d_k}, sqrt(d_k) = {math.sqrt(e.d_k):.3f}"
                  + (" (queries and keys rotated by RoPE)" if e.rotary else "")
                  + "\n   (layers, heads and tokens count from 0)")
    console.print(f"1. query  q = x W_Q = {_vector(e.query.tolist(), args.dims)}")
    table = Table(title="2-6: each key, its score, its weight, its weighted value", title_justify="left")
    for name, justify in (("j", "right"), ("token", "left"), ("2. key k_j", "left"), ("3. q·k_j", "right"),
                          ("4. ÷ sqrt(d_k)", "right")):
        table.add_column(name, justify=justify, no_wrap=True)
    if e.bias is not None:
        table.add_column("+ ALiBi bias", justify="right")
    table.add_column("5. softmax a_j", justify="right", no_wrap=True)
    table.add_column("6. a_j v_j", justify="left", no_wrap=True)
    best = int(e.weights.argmax())
    for j, label in enumerate(e.key_labels):
        row = [str(j), repr(label), _vector(e.keys[j].tolist(), args.dims), f"{float(e.dots[j]):+.4f}",
               f"{float(e.scaled[j]):+.4f}"]
        if e.bias is not None:
            row.append(f"{float(e.bias[j]):+.4f}")
        row += [f"{float(e.weights[j]):.4f}" if e.visible[j] else "masked",
                _vector(e.weighted[j].tolist(), args.dims)]
        style = "dim" if not e.visible[j] else "bold" if j == best else None
        table.add_row(*row, style=style)
    console.print(table)
    console.print(f"   sum of the weights = {float(e.weights.sum()):.6f}")
    console.print(f"7. output z = Σ a_j v_j      = {_vector(e.output.tolist(), args.dims)}")
    console.print(f"   the model's head output   = {_vector(e.model_output.tolist(), args.dims)}")
    if e.matches_model:
        console.print(f"[green]equal[/]: max |z - model| = {e.max_error:.2e} <= {TOLERANCE:g}")
        return 0
    console.print(f"[red]different[/]: max |z - model| = {e.max_error:.2e} > {TOLERANCE:g}; please report this")
    return 1
