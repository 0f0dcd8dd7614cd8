"""``qkv embed --checkpoint DIR "text" ...``: sentence embeddings, or how similar the texts are to each other."""

from __future__ import annotations

import argparse
import json

from .options import add_checkpoint, add_quantize, load_checkpoint, text_lines


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed", help="sentence embeddings or a cosine-similarity matrix",
        description="Embed each text with a model's encoder: hidden states mean-pooled over the real tokens, "
                    "L2-normalised (as sentence-transformers models such as all-MiniLM-L6-v2 do). Texts come "
                    "as arguments or one per line on stdin.",
    )
    add_checkpoint(p)
    add_quantize(p)
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to embed (default: one per line on stdin)")
    p.add_argument("--similarity", action="store_true", help="print the cosine similarity of every pair instead")
    p.add_argument("--pooling", choices=["mean", "cls"], default="mean",
                   help="average the real tokens (default) or take the first token's state")
    p.add_argument("--no-normalize", dest="normalize", action="store_false",
                   help="print the pooled vectors without scaling them to unit length")
    p.add_argument("--json", action="store_true", help="print JSON instead of plain columns")
    p.add_argument("--precision", type=int, default=4, help="decimals printed (default 4)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from qkv.interop.bert import embed_texts

    if not 0 <= args.precision <= 17:  # 17 significant digits tell every float64 apart; more are noise
        raise ValueError(f"--precision={args.precision} must lie in [0, 17] decimals")
    texts = text_lines(args.texts)
    model, tokenizer = load_checkpoint(args.checkpoint, quantize=args.quantize)
    vectors = embed_texts(model, tokenizer, texts, pooling=args.pooling,
                          normalize=args.normalize or args.similarity)
    digits = args.precision
    if args.similarity:
        table = (vectors @ vectors.T).tolist()
        if args.json:
            print(json.dumps({"texts": texts, "similarity": [[round(x, digits) for x in row] for row in table]}))
            return 0
        width = digits + 3
        print("    " + " ".join(f"{j + 1:>{width}}" for j in range(len(texts))))
        for i, row in enumerate(table):
            cells = " ".join(f"{x:>{width}.{digits}f}" for x in row)
            label = texts[i] if len(texts[i]) <= 40 else texts[i][:39] + "…"
            print(f"{i + 1:>3} {cells}  {label}")
        return 0
    if args.json:
        print(json.dumps([{"text": t, "embedding": [round(x, digits) for x in v]}
                          for t, v in zip(texts, vectors.tolist(), strict=True)]))
        return 0
    for v in vectors.tolist():
        print(" ".join(f"{x:.{digits}f}" for x in v))
    return 0
