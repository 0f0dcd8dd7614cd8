"""``qkv info PRESET``: parameter counts per component and in total."""

from __future__ import annotations

import argparse

from qkv.config import PRESETS, ModelConfig
from qkv.models import build_model, parameter_counts


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameter counts of a preset, per component and in total",
                       description="Build a preset on the meta device (no memory) and count its parameters.")
    p.add_argument("preset", help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--vocab-size", type=int, help="override the vocabulary size")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    overrides = {} if args.vocab_size is None else {"vocab_size": args.vocab_size}
    config = ModelConfig.preset(args.preset, **overrides)
    with torch.device("meta"):  # shapes only: even vaswani-big costs no memory
        model = build_model(config)
    counts = parameter_counts(model)
    width = max(len(k) for k in counts)
    print(f"{args.preset}: {type(model).__name__}  d_model={config.d_model} heads={config.n_heads} "
          f"d_ff={config.d_ff} layers={config.n_encoder_layers}+{config.n_decoder_layers} "
          f"vocab={config.vocab_size} positional={config.positional} norm={config.norm_position}-LN")
    for name, n in counts.items():
        print(f"  {name:<{width}}  {n:>13,}")
    total = sum(counts.values())
    print(f"  {'total':<{width}}  {total:>13,}  ({total / 1e6:.1f}M)")
    return 0
