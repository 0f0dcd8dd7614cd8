"""``qkv translate --checkpoint DIR "text"``: translate sentences with a trained encoder-decoder Transformer, or
with a chat model asked by ``--instruction``."""

from __future__ import annotations

import argparse

from .options import (
    add_checkpoint,
    add_dtype,
    add_quantize,
    add_threads,
    load_checkpoint,
    load_dtype,
    stdin_lines,
    use_threads,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("translate", help="translate sentences with a trained encoder-decoder checkpoint, or a chat "
                                         "model and an instruction",
                       description="Translate each sentence given on the command line, or each line of stdin, "
                                   "with beam search (GNMT length penalty) or greedy decoding (--beam 1). One "
                                   "translation is printed per line, in the input order. A chat model (a decoder: "
                                   "SmolLM2-135M-Instruct, a fine-tuned run) is asked with --instruction.")
    p.add_argument("text", nargs="*", help="sentences to translate (default: read stdin, one sentence a line)")
    add_checkpoint(p, help="a checkpoint or run directory")
    add_quantize(p)
    p.add_argument("--beam", type=int, default=4, help="beam size; 1 = greedy (default 4, as in the paper)")
    p.add_argument("--alpha", type=float, default=0.6, help="length penalty alpha (default 0.6)")
    p.add_argument("--batch-size", type=int, default=64, help="sentences decoded together (default 64)")
    p.add_argument("--instruction", metavar="TEXT",
                   help="a chat model's request, with {source} where the sentence goes, e.g. 'Translate to French: "
                        "{source}': one user turn in the model's chat template; the reply is the translation")
    add_dtype(p, help="the weights' precision once loaded (default fp32; bf16 runs about twice as fast on a CPU with "
                      "AVX512_BF16)")
    add_threads(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from qkv.models import model_type_of
    from qkv.recipes.translation import translate

    use_threads(args.threads)
    model, tokenizer = load_checkpoint(args.checkpoint, quantize=args.quantize, dtype=load_dtype(args.dtype))
    if model_type_of(model) == "decoder" and args.instruction is None:
        raise ValueError(f"{args.checkpoint} holds a decoder, which translates only when asked: pass --instruction "
                         "with {source} where the sentence goes (e.g. 'Translate to French: {source}'), or use an "
                         "encoder-decoder trained by `qkv train vaswani-small --data PARALLEL_FILE`")
    lines = args.text if args.text else list(stdin_lines())  # blank lines kept: one output line per input line
    keep = [i for i, line in enumerate(lines) if line.strip()]
    out = [""] * len(lines)
    for i, translation in zip(keep, translate(model, tokenizer, [lines[i].strip() for i in keep], beam=args.beam,
                                              alpha=args.alpha, batch_size=args.batch_size,
                                              instruction=args.instruction), strict=True):
        out[i] = translation
    for line in out:
        print(line)
    return 0
