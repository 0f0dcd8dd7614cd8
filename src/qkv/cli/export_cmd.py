"""``qkv export RUN --out DIR``: a fine-tuned run as a standalone checkpoint (``--merge``: the adapters merged in)."""

from __future__ import annotations

import argparse
import sys

from .options import add_dtype


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write a fine-tuned run as a standalone qkv checkpoint or Hugging Face directory",
        description="Write RUN (a qkv train run or checkpoint; a LoRA run's adapters are put back on its base) as a "
                    "standalone directory. --merge merges LoRA adapters into the weights (in fp32, then cast to "
                    "--dtype); --format qkv writes a qkv checkpoint, --format hf a Hugging Face LLaMA (RoPE models) "
                    "or GPT-2 directory that transformers' from_pretrained reads, tied as the base was. Without "
                    "--merge a LoRA run keeps its adapters: --format qkv writes them with their base's record, "
                    "--format hf writes DIR/base (the base) and DIR/adapter (peft's files under Hugging Face's "
                    "names: PeftModel.from_pretrained(base, DIR/adapter)).")
    p.add_argument("source", metavar="RUN", help="a run directory or checkpoint written by qkv train")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="where to write: a new or empty directory (never the run itself or one that holds it)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already holds files")
    p.add_argument("--format", choices=["qkv", "hf"], default="qkv", help="qkv checkpoint (default) or Hugging Face")
    p.add_argument("--merge", action="store_true", help="merge LoRA adapters into the weights")
    add_dtype(p, help="the precision written (merging itself is always fp32); default fp32")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from qkv.recipes.finetune import export_run

    out = export_run(args.source, args.out, merge=args.merge, format=args.format, dtype=args.dtype,
                     overwrite=args.overwrite)
    print(f"wrote {out}", file=sys.stderr)
    return 0
