"""``qkv info PRESET`` or ``qkv info --checkpoint DIR``: parameter counts per component and in total."""

from __future__ import annotations

import argparse
from pathlib import Path

from qkv.cli.options import add_checkpoint
from qkv.config import PRESETS, ModelConfig
from qkv.models import build_model, parameter_counts


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameter counts of a preset or a checkpoint, per component and in total",
                       description="Build a preset on the meta device (no memory), or load a checkpoint, and count "
                                   "its parameters.")
    p.add_argument("preset", nargs="?", help=f"one of: {', '.join(PRESETS)}")
    add_checkpoint(p, required=False)
    p.add_argument("--vocab-size", type=int, help="override the vocabulary size (presets only)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    if (args.preset is None) == (args.checkpoint is None):
        raise ValueError("name a preset or a checkpoint (not both): qkv info tiny-decoder, or qkv info "
                         "--checkpoint runs/demo")
    if args.checkpoint is not None:
        if args.vocab_size is not None:
            raise ValueError("--vocab-size overrides a preset's; a checkpoint's vocabulary is its own")
        from qkv.loading import load

        model, _ = load(args.checkpoint)
        name, config = args.checkpoint, model.config
    else:
        if args.preset not in PRESETS and Path(args.preset).exists():
            raise ValueError(f"{args.preset} is a path, not a preset; count a checkpoint's parameters with "
                             f"qkv info --checkpoint {args.preset}")
        overrides = {} if args.vocab_size is None else {"vocab_size": args.vocab_size}
        name, config = args.preset, ModelConfig.preset(args.preset, **overrides)
        with torch.device("meta"):  # shapes only: even vaswani-big costs no memory
            model = build_model(config)
    counts = parameter_counts(model)
    width = max(len(k) for k in counts)
    print(f"{name}: {type(model).__name__}  d_model={config.d_model} heads={config.n_heads} "
          f"d_ff={config.d_ff} layers={config.n_encoder_layers}+{config.n_decoder_layers} "
          f"vocab={config.vocab_size} positional={config.positional} norm={config.norm_position}-LN")
    for name, n in counts.items():
        print(f"  {name:<{width}}  {n:>13,}")
    total = sum(counts.values())
    print(f"  {'total':<{width}}  {total:>13,}  ({total / 1e6:.1f}M)")
    return 0
