"""``qkv show attention|positions``: attention maps and positional encodings as PNG pictures."""

from __future__ import annotations

import argparse
from pathlib import Path

from qkv.positions import POSITIONAL_KINDS

from .options import add_checkpoint, add_picture, add_quantize, first_line, load_checkpoint, query_token


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("show", help="draw attention maps or positional encodings as PNG pictures",
                       description="Pictures of what a model computes (matplotlib, written as PNG files).")
    what = p.add_subparsers(dest="what", metavar="WHAT", required=True)

    a = what.add_parser("attention", help="a grid of heatmaps, layers x heads, or one head enlarged",
                        description="Run a text through a model and draw every attention map, token labels on "
                                    "both axes: one row per layer, one column per head. An encoder-decoder "
                                    "gives three pictures: encoder self-attention, decoder masked "
                                    "self-attention and cross-attention.")
    add_checkpoint(a)
    add_quantize(a)
    a.add_argument("text", nargs="?", help="the text (default: the first line of stdin)")
    a.add_argument("--target", help="encoder-decoder only: the decoder's text (default: the model's own translation)")
    a.add_argument("--layer", type=int, help="draw only this layer (negative counts from the end)")
    a.add_argument("--head", type=int, help="with --layer: enlarge this one head")
    a.add_argument("--pick", action="append", default=[], metavar="LAYER:HEAD",
                   help="draw these heads side by side (repeat: --pick 3:1 --pick 5:11)")
    a.add_argument("--lines", action="store_true",
                   help="draw lines (query → key, opacity = weight, a colour per head) instead of heatmaps; "
                        "with --layer alone, every head of that layer is overlaid")
    a.add_argument("--token", help="highlight one query token: its index or its text (e.g. it)")
    a.add_argument("--kind", choices=["encoder", "decoder_self", "cross"],
                   help="encoder-decoder only: draw one kind of attention (default: all three)")
    add_picture(a, "runs/show/attention.png", "where to write the picture (default runs/show/attention.png; an "
                "encoder-decoder adds -encoder, -decoder_self, -cross to the name)")
    a.set_defaults(run=run_attention)

    s = what.add_parser("positions", help="a positional encoding's table and its dot product against distance",
                        description="Draw a positional encoding: its table as a heatmap (positions x "
                                    "dimensions) and how two positions relate as a function of their distance. "
                                    "Takes the encoding a checkpoint uses, or one by kind.")
    source = s.add_mutually_exclusive_group()
    add_checkpoint(source, required=False, help="draw the encoding this model uses (trained tables)")
    source.add_argument("--positional", default=None, choices=[*POSITIONAL_KINDS, "all"],
                        help="draw a stand-alone encoding of this kind, or all of them (default: sinusoidal)")
    s.add_argument("--positions", type=int, default=64, help="how many positions to draw (default 64)")
    s.add_argument("--d-model", type=int, default=128, help="with --positional: the model width (default 128)")
    s.add_argument("--heads", type=int, default=8, help="with --positional: heads, for RoPE and ALiBi (default 8)")
    add_picture(s, "runs/show/positions.png", "where to write the picture (default runs/show/positions.png; "
                "several encodings add -KIND to the name)")
    s.set_defaults(run=run_positions)


def _suffixed(path: Path, suffix: str) -> Path:
    return path.with_name(f"{path.stem}-{suffix}{path.suffix or '.png'}")


def _pick(spec: str) -> tuple[int, int]:
    layer, sep, head = spec.partition(":")
    if not sep or not layer.strip().lstrip("-").isdigit() or not head.strip().lstrip("-").isdigit():
        raise ValueError(f"--pick {spec!r} is not LAYER:HEAD; write e.g. --pick 3:1")
    return int(layer), int(head)


def _what_was_drawn(shown: list[tuple[int, int]], shape: tuple[int, int], lines: bool) -> str:
    """'4 layers x 4 heads', or the heads drawn: 'layer 3 head 1' ... (counting from 0), 'as lines'."""
    n_layers, n_heads = shape
    layers = sorted({layer for layer, _ in shown})
    if len(shown) == len(layers) * n_heads:  # whole layers
        what = f"{n_layers} layers x {n_heads} heads" if len(layers) == n_layers else \
            f"layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))} x {n_heads} heads"
    else:
        what = ", ".join(f"layer {layer} head {head}" for layer, head in shown)
    return what + (" as lines" if lines else "") + " (counting from 0)"


def run_attention(args: argparse.Namespace) -> int:
    from qkv.viz import KIND_TITLES, attention_maps, attention_picture, save_figure

    if args.head is not None and args.layer is None:
        raise ValueError("--head needs --layer: name the layer whose head to enlarge, e.g. --layer 0 --head 3")
    if args.pick and (args.layer is not None or args.head is not None):
        raise ValueError("--pick names layer and head itself; leave out --layer and --head")
    picks = [_pick(p) for p in args.pick]
    text = first_line(args.text)
    model, tokenizer = load_checkpoint(args.checkpoint, quantize=args.quantize)
    found = attention_maps(model, tokenizer, text, args.target)
    kinds = [found.kind(args.kind)] if args.kind else found.kinds
    out = Path(args.out)
    print(f"{len(found.inputs.labels)} tokens: {' '.join(repr(t) for t in found.inputs.labels)}")
    for kind in kinds:
        queries = found.labels(kind)[0]
        token = None if args.token is None else query_token(queries, args.token)
        title = f"{KIND_TITLES[kind]}: {text if len(text) <= 70 else text[:69] + '…'}"
        fig, shown = attention_picture(found, kind, layer=args.layer, head=args.head, picks=picks, lines=args.lines,
                                       token=token, title=title)
        path = save_figure(fig, _suffixed(out, kind) if len(kinds) > 1 else out, dpi=args.dpi)
        print(f"wrote {path}  ({KIND_TITLES[kind]}: {_what_was_drawn(shown, found.maps[kind].shape[:2], args.lines)})")
        for layer, head in shown if token is not None else ():
            best = ", ".join(f"{key!r} {w:.2f}" for key, w in found.strongest_keys(kind, layer, head, token))
            print(f"  layer {layer} head {head}: {queries[token]!r} attends most to {best}")
    return 0


def run_positions(args: argparse.Namespace) -> int:
    from qkv.viz import encoding_for_kind, positions_figure, save_figure

    out = Path(args.out)
    if args.checkpoint:
        model, _ = load_checkpoint(args.checkpoint)
        encodings = {model.config.positional: model.embed.positional}
        where = f" of {args.checkpoint}"
    else:
        kinds = POSITIONAL_KINDS if args.positional == "all" else [args.positional or "sinusoidal"]
        encodings = {k: encoding_for_kind(k, n_positions=args.positions, d_model=args.d_model,
                                          n_heads=args.heads) for k in kinds}
        where = f" (d_model={args.d_model}, {args.heads} heads)"
    for kind, encoding in encodings.items():
        fig = positions_figure(encoding, args.positions, title=f"positional encoding: {kind}{where}")
        path = save_figure(fig, _suffixed(out, kind) if len(encodings) > 1 else out, dpi=args.dpi)
        print(f"wrote {path}  ({kind})")
    return 0
