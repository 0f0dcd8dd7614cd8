"""``qkv bench [training|attention|generate|all|serve]``: how fast qkv trains, attends and generates, as tables;
``serve``: qkv serve's OpenAI API under concurrent clients.

Every comparison is measured in one run, the contenders interleaved, so the ratios hold on a busy machine
even when the absolute figures do not.
"""

from __future__ import annotations

import argparse
import os

from .options import add_checkpoint, add_device, add_threads, use_threads

SUITES = ("training", "attention", "generate", "all", "serve")  # serve: not in all (it needs --checkpoint)
GENERATE_SECTIONS = ("small", "gpt2", "cache", "smollm2")  # qkv.bench.generation's, named here without torch


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: training tokens/s vs Hugging Face and x-transformers, "
                                     "attention memory vs length, generation tokens/s",
                       description="Measure qkv against the libraries people would pick instead, in one run.")
    p.add_argument("suite", nargs="?", default="all", choices=SUITES, help="what to measure (default: all)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, one run each: seconds, for smoke tests")
    p.add_argument("--compile", action="store_true",
                   help="also train qkv under torch.compile (an extra row; compiling takes a minute or more)")
    add_threads(p, every_core=True, help="torch threads for every contender (default: every core this process "
                                         "may use)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved runs per contender; the median is shown")
    add_device(p, default="cpu", help="where the training benchmark runs (cpu, cuda, ...)")
    p.add_argument("--bf16", action="store_true",
                   help="train every contender under bf16 autocast on the CPU too, against a bf16 matmul peak "
                        "(pays on CPUs with AVX512_BF16 or AMX; on an accelerator bf16 is the default)")
    gen = p.add_argument_group("generate (qkv bench generate)")
    gen.add_argument("--only", choices=GENERATE_SECTIONS, action="append", metavar="SECTION",
                     help=f"run only these sections ({', '.join(GENERATE_SECTIONS)}; repeatable; smollm2: SmolLM2 "
                          "in fp32/bf16/int8/int4, eager and compiled, and llama.cpp, each run a fresh process)")
    gen.add_argument("--contenders", nargs="+", metavar="NAME",
                     help="the SmolLM2 contenders (fp32, bf16, int8, int4, each also as 'NAME compiled', and "
                          "llama.cpp; default: all)")
    serve = p.add_argument_group("serve (qkv bench serve --checkpoint PATH: concurrent OpenAI clients on loopback)")
    add_checkpoint(serve, required=False, help="the model qkv serve loads for the serve benchmark")
    serve.add_argument("--clients", type=int, default=16, help="concurrent streaming chat clients (default 16)")
    serve.add_argument("--seconds", type=float, default=20.0, help="how long the clients send requests (default 20)")
    serve.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request (default 32)")
    serve.add_argument("--queue-size", type=int, default=None, help="the server's --queue-size (default: its own)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from qkv.bench import require_contenders
    from qkv.devices import resolve_device

    if args.repeats < 1:
        raise ValueError(f"--repeats={args.repeats} must be >= 1")
    if (args.only or args.contenders) and args.suite != "generate":
        raise ValueError("--only and --contenders choose what qkv bench generate measures: add the word generate "
                         "(qkv bench generate --only smollm2)")
    if args.suite == "serve":
        return run_serve(args)
    device = resolve_device(args.device)
    suites = ("training", "attention", "generate") if args.suite == "all" else (args.suite,)
    require_contenders(suites)
    use_threads(args.threads, every_core=True)  # for the benchmark only, never on import
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"qkv bench: torch {torch.__version__}, {torch.get_num_threads()} threads{load}", flush=True)
    for suite in suites:
        print(flush=True)
        if suite == "training":
            from qkv.bench.training import format_training_table, training_benchmark

            rows = training_benchmark(quick=args.quick, compile=args.compile, repeats=args.repeats,
                                      device=device, bf16=True if args.bf16 else None)
            print(format_training_table(rows), flush=True)
        elif suite == "attention":
            from qkv.bench.attention import attention_benchmark, format_attention_table

            print(format_attention_table(attention_benchmark(quick=args.quick, repeats=args.repeats)), flush=True)
        else:
            from qkv.bench.generation import format_generation_table, generation_benchmark

            rows = generation_benchmark(args.quick, threads=torch.get_num_threads(), repeats=args.repeats,
                                        sections=tuple(args.only or GENERATE_SECTIONS), contenders=args.contenders)
            print("Generation", flush=True)
            print(format_generation_table(rows), flush=True)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    """``qkv bench serve``: qkv serve in a subprocess on 127.0.0.1, ``--clients`` clients for ``--seconds``."""
    from qkv.bench.serve import format_serve_load, serve_load

    if args.checkpoint is None:
        raise ValueError("qkv bench serve needs --checkpoint PATH: the model qkv serve loads")
    for name in ("clients", "max_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if not args.seconds > 0:
        raise ValueError(f"--seconds={args.seconds} must be > 0")
    result = serve_load(args.checkpoint, clients=args.clients, seconds=args.seconds, max_tokens=args.max_tokens,
                        queue_size=args.queue_size, threads=args.threads, progress=True)
    print(format_serve_load(result), flush=True)
    return 0 if result.errors == 0 else 1
