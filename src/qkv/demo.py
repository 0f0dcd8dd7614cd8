"""``make demo`` (foundation version): build a small model, run the seed sentence through it, draw one head.

The training issue turns this into: train on tiny Shakespeare, generate, then draw.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from qkv.config import ModelConfig
from qkv.models import DecoderLM, parameter_counts
from qkv.tokenizers import Tokenizer
from qkv.viz import attention_heatmap, save_figure

SEED_SENTENCE = "The animal didn't cross the street because it was too tired."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--layer", type=int, default=0)
    parser.add_argument("--head", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    tokenizer = Tokenizer.char(SEED_SENTENCE)
    config = ModelConfig.preset("tiny-decoder", vocab_size=tokenizer.vocab_size)
    model = DecoderLM(config).eval()
    ids = torch.tensor([tokenizer.encode(SEED_SENTENCE)])
    with torch.no_grad():
        logits, attentions = model(ids, return_attention=True)

    print(f"sentence: {SEED_SENTENCE!r}")
    print(f"tokens:   {ids.shape[1]} characters, vocabulary {tokenizer.vocab_size}")
    print(f"ids       {tuple(ids.shape)}  →  logits {tuple(logits.shape)}")
    print(f"attention per layer: {[tuple(a.shape) for a in attentions]}  (batch, heads, query, key)")
    print("parameters:")
    for name, n in parameter_counts(model).items():
        print(f"  {name:<32} {n:>9,}")
    print(f"  {'total':<32} {model.num_parameters():>9,}")

    weights = attentions[args.layer][0, args.head]
    pieces = tokenizer.pieces(SEED_SENTENCE)
    it = pieces.index("i", SEED_SENTENCE.index(" it ")) if " it " in SEED_SENTENCE else len(pieces) - 1
    top = weights[it].topk(5)
    print(f"layer {args.layer}, head {args.head}: where the query 'i' of \"it\" looks (untrained weights):")
    for w, j in zip(top.values.tolist(), top.indices.tolist(), strict=True):
        print(f"  key {j:>2} {pieces[j]!r:>5}  weight {w:.3f}")
    path = save_figure(
        attention_heatmap(weights, pieces, title=f"layer {args.layer}, head {args.head} (untrained)"),
        Path(args.out) / "attention.png",
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
