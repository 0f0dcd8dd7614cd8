"""``qkv eval --checkpoint DIR [--data PATH]``: validation loss and perplexity of a trained model; ``--bleu``:
BLEU and chrF of a translation checkpoint on its test split."""

from __future__ import annotations

import argparse

from .options import add_checkpoint, add_dtype, add_quantize, add_threads, load_dtype, use_threads


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="loss and perplexity of a checkpoint on a text",
                       description="Mean cross-entropy per predicted token (nats) and perplexity = exp(loss) of "
                                   "a checkpoint, on the validation split of a text (default: the text it "
                                   "trained on) or on the whole text (--split all).")
    add_checkpoint(p, help="a checkpoint or run directory")
    add_quantize(p)
    add_dtype(p, help="the weights' precision once loaded (default fp32; bf16 runs about twice as fast on a CPU "
                      "with AVX512_BF16)")
    p.add_argument("--data", help="a text file or folder (default: the text the run trained on)")
    p.add_argument("--split", choices=["val", "all"], default="val",
                   help="val: the last 10%% of the text (default); all: the whole text")
    p.add_argument("--base", action="store_true",
                   help="a fine-tuning run (qkv train --init-from): score the model it started from on the same "
                        "batches, the loss before fine-tuning")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--context", type=int, help="tokens per window (default: the model's max_seq_len)")
    add_threads(p)
    bleu = p.add_argument_group("translation (a checkpoint trained on a parallel file, or a chat model)")
    bleu.add_argument("--bleu", action="store_true",
                      help="corpus BLEU (sacrebleu, 13a) and chrF on the held-out test split, detokenized output "
                           "against all raw references")
    bleu.add_argument("--beam", type=int, nargs="+", default=[1, 4], metavar="N",
                      help="beam sizes to score; 1 = greedy (default: 1 4)")
    bleu.add_argument("--alpha", type=float, default=0.6, help="beam search length penalty alpha (default 0.6)")
    bleu.add_argument("--limit", type=int, help="score only the first N test sentences (a quick look)")
    bleu.add_argument("--samples", type=int, default=10, help="sample translations to print (default 10)")
    bleu.add_argument("--report", metavar="FILE", help="also write scores, samples and hypotheses as JSON")
    bleu.add_argument("--instruction", metavar="TEXT",
                      help="a chat model (a decoder) translates by instruction: the user message, with {source} "
                           "where the sentence goes, e.g. 'Translate to French: {source}'; it translates the "
                           "test split of --data PAIRS (the translation recipe's split), replies cut at the "
                           "template's end of turn")
    bleu.add_argument("--average", type=int, metavar="N",
                      help="score the average of the run's newest N checkpoints (the paper averages 5)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from qkv.evaluation import evaluate_checkpoint
    from qkv.losses import perplexity_text

    use_threads(args.threads)
    if args.bleu:
        from qkv.evaluation import bleu_report

        if args.base:
            raise ValueError("--base scores the loss of a run's base model; for its BLEU pass the base itself as "
                             "--checkpoint (a GGUF file or directory)")
        bleu_report(args.checkpoint, beams=args.beam, alpha=args.alpha, limit=args.limit, samples=args.samples,
                    report=args.report, average=args.average, quantize=args.quantize, data=args.data,
                    instruction=args.instruction, dtype=load_dtype(args.dtype), batch_size=args.batch_size)
        return 0
    result = evaluate_checkpoint(args.checkpoint, args.data, split=args.split, batch_size=args.batch_size,
                                 context=args.context, quantize=args.quantize,
                                 dtype=load_dtype(args.dtype), base=args.base)
    print(f"loss {result['loss']:.4f} nats/token, perplexity {perplexity_text(result['loss'])} "
          f"({result['split']} split of {result['data']}, {result['tokens']:,} tokens, {result['checkpoint']})")
    return 0
