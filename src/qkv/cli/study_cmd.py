"""``qkv study positions | order | scale | scaling``: measure what positional encodings, the attention scale and
size do.

The studies live in :mod:`qkv.study`; this command picks one, sets the thread count, and prints where the
results went.
"""

from __future__ import annotations

import argparse

from .options import add_threads, check_threads, use_threads

STUDY_HELP = {
    "positions": "length extrapolation: perplexity at L, 2L, 4L, 8L for sinusoidal, learned, RoPE, ALiBi, none",
    "order": "'dog bites man': permutation, shuffled words and the causal-mask leak, with and without positions",
    "scale": "the attention scale, the forgotten 1/sqrt(d_k) in softmax(QK^T/sqrt(d_k)): saturation at "
             "initialisation and training with and without it",
    "scaling": "scaling laws: loss against model size, data and compute (isoFLOP valleys, L(N, D) fitted), "
               "sized to --budget-hours; resumable",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="measure what positional encoding, the attention scale and model size do",
                       description="Train small models and measure; write results.md, results.csv and PNG plots "
                                   "into OUT/<study>/. " + "; ".join(f"{k}: {v}" for k, v in STUDY_HELP.items()))
    p.add_argument("study", choices=tuple(STUDY_HELP), help="which study to run")
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds (what the tests run)")
    p.add_argument("--out", default=None,
                   help="folder for the results (default: runs/study; scaling: ~/.cache/qkv/study, outside the work "
                        "tree, where its checkpoints live and where it continues after a stop)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and data order (default: 0)")
    add_threads(p, every_core=True, help="torch threads (default: every core this process may use; on a busy "
                                         "machine 1 is often faster)")
    p.add_argument("--data", default=None,
                   help="order study only: a Tatoeba zip or english<TAB>other file (default: "
                        "data/tatoeba-fra-eng-2017-09-29.zip)")
    p.add_argument("--bf16", action="store_true",
                   help="scale study only: add bf16-autocast training runs (slow on CPUs without bf16 units)")
    p.add_argument("--budget-hours", type=float, default=None, metavar="H",
                   help="scaling study only: the wall time to size the study to (default 2.5; a study under way "
                        "keeps the hours it was planned with)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from qkv.study import STUDIES

    if args.threads is not None:
        check_threads(args.threads)  # checked with the other flags, before any work
    if args.data is not None and args.study != "order":
        raise ValueError(f"--data is read by the order study only; leave it out for {args.study}")
    if args.bf16 and args.study != "scale":
        raise ValueError(f"--bf16 is read by the scale study only; leave it out for {args.study}")
    if args.budget_hours is not None and args.study != "scaling":
        raise ValueError(f"--budget-hours is read by the scaling study only; leave it out for {args.study}")
    use_threads(args.threads, every_core=True)  # for this command only, never on import
    extra = ({"data": args.data} if args.study == "order" else {"bf16": True} if args.bf16 else
             {"budget_hours": args.budget_hours} if args.study == "scaling" else {})
    out = args.out if args.out is not None or args.study == "scaling" else "runs/study"
    result = STUDIES[args.study](quick=args.quick, out_dir=out, seed=args.seed,
                                 progress=not args.no_progress, **extra)
    print((result.out_dir / "results.md").read_text())
    quick = " (a quick run: see its first line)" if result.quick else ""
    print(f"wrote {result.out_dir}/ (results.md, results.csv, {', '.join(f.name for f in result.figures)}) "
          f"in {result.seconds:.0f} s{quick}")
    return 0
