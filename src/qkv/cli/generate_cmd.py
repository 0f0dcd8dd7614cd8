"""``qkv generate --checkpoint DIR "prompt"``: continue text with a trained model, printing it as it comes.

The prompt is the positional argument, or, without one, each line of stdin in turn. A decoder-only model
prints the prompt followed by its continuation; an encoder-decoder model prints the target sentence. Past the
model's context the text goes on over a sliding window of its last max_seq_len tokens (``--no-sliding-window``
refuses instead, in one line before any output).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable

from .options import (
    add_checkpoint,
    add_compile,
    add_dtype,
    add_quantize,
    add_sampling,
    add_threads,
    compile_if_asked,
    load_checkpoint,
    load_dtype,
    sampling_options,
    stdin_lines,
    use_threads,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a trained model, streaming the text",
                       description="Continue each prompt with a trained model (greedy, sampling or beam search), "
                                   "printing the text as it is produced. Prompts: the argument, or stdin lines.")
    p.add_argument("prompt", nargs="?", help="the text to continue (default: read prompts from stdin, one a line)")
    add_checkpoint(p)
    add_sampling(p)
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (prints at the end)")
    p.add_argument("--length-penalty", type=float, default=0.6, help="beam search's GNMT alpha (0.6)")
    p.add_argument("--no-cache", action="store_true",
                   help="recompute the whole prefix every step instead of keeping keys and values (slow). The same "
                        "text within the context; past it, a RoPE, ALiBi or position-free model re-encodes the "
                        "window of the last max_seq_len tokens instead of rolling its cache, so the text differs")
    p.add_argument("--no-sliding-window", action="store_true",
                   help="refuse when prompt + new tokens exceed the model's context (max_seq_len) instead of going "
                        "on over a window of the last max_seq_len tokens (the default)")
    add_dtype(p, help="the weights' precision while generating: bf16 reads half the bytes per token (SmolLM2 on 2 "
                      "cores: 24 instead of 15 tokens/s on a CPU with bf16 instructions); fp32 (default)")
    add_quantize(p)
    add_compile(p)
    add_threads(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from qkv.generation import GenerationConfig, generate_text, stream_text
    from qkv.models import model_type_of

    config = GenerationConfig(
        **sampling_options(args), num_beams=args.num_beams, length_penalty=args.length_penalty,
        use_cache=not args.no_cache, sliding_window=not args.no_sliding_window,
    )
    use_threads(args.threads)
    if args.compile and args.no_cache:
        raise ValueError("--compile compiles the one-token step of cached decoding; without the cache each step "
                         "reads a longer prefix (a new graph every time): drop --no-cache or --compile")
    model, tokenizer = load_checkpoint(args.checkpoint, dtype=load_dtype(args.dtype), quantize=args.quantize)
    model = compile_if_asked(model, args.compile)
    echo = model_type_of(model) != "seq2seq"  # a continuation follows its prompt; a translation stands alone
    out = sys.stdout
    for prompt in [args.prompt] if args.prompt is not None else stdin_lines():  # each answered before the next
        # Every check runs before anything is printed: an error is one line on stderr, never after the echo.
        if config.num_beams > 1:
            pieces: Iterable[str] = [generate_text(model, tokenizer, prompt, config=config)]
        else:
            pieces = stream_text(model, tokenizer, prompt, config=config)
        if echo:
            out.write(prompt)
            out.flush()
        for piece in pieces:
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()
    return 0
