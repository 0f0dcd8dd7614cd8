"""The flags several ``qkv`` commands share, each defined once: the same name, type, default and meaning wherever it
appears (``--checkpoint``, ``--threads``, ``--device``, ``--dtype``, a picture's ``--out`` and ``--dpi``), and the
one way input text is read (the arguments, else stdin). A command adds a flag with ``add_*`` and turns its value
into a library argument with the function beside it; what the command does stays in the library.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

__all__ = ["CHECKPOINT_HELP", "add_checkpoint", "load_checkpoint", "add_threads", "use_threads", "check_threads",
           "add_device", "add_dtype", "load_dtype", "add_picture", "first_line", "text_lines", "stdin_lines",
           "query_token", "add_sampling", "sampling_options", "add_quantize", "QUANTIZE_MODES", "add_compile",
           "compile_if_asked"]

CHECKPOINT_HELP = ("a qkv checkpoint or run directory, a Hugging Face GPT-2 / BERT / LLaMA directory, or a LLaMA "
                   ".gguf file")


def add_checkpoint(parser: argparse.ArgumentParser, *, required: bool = True, help: str = CHECKPOINT_HELP) -> None:
    """``--checkpoint DIR``: the model the command loads with ``qkv.load``."""
    parser.add_argument("--checkpoint", required=required, metavar="DIR", help=help)


def load_checkpoint(checkpoint: str, *, dtype=None, quantize: str | None = None):
    """``qkv.load(checkpoint)`` for a command that reads text: the model and its tokenizer, which must be there;
    ``quantize`` is ``--quantize``'s value."""
    from qkv.loading import load

    model, tokenizer = load(checkpoint, dtype=dtype, quantize=quantize)
    if tokenizer is None:
        raise ValueError(f"{checkpoint} has no tokenizer; add its tokenizer.json (or vocab files) to the directory")
    return model, tokenizer


QUANTIZE_MODES = ("int8", "int4")  # qkv.quantize.MODES, named here so the parser needs no torch


def add_quantize(parser: argparse.ArgumentParser) -> None:
    """``--quantize {int8,int4}``: weight-only quantized linear layers, packed for this CPU as the model loads
    (``qkv.load(..., quantize=)``); pass its value to :func:`load_checkpoint`."""
    parser.add_argument("--quantize", choices=QUANTIZE_MODES, default=None,
                        help="int8 or int4 weights in every linear layer (the output layer int8), packed for "
                             "this CPU as the model loads (bf16 activations inside them): int8 reads half the bytes "
                             "of bf16, int4 (groups of 64; a GGUF file's Q4 blocks as they are) about a third; "
                             "results differ from the unquantized model's by the rounding (default: off)")


def add_compile(parser: argparse.ArgumentParser) -> None:
    """``--compile``: decode through a compiled step (``qkv.generation.compile_decoder``)."""
    parser.add_argument("--compile", action="store_true",
                        help="compile the one-token decode step with torch.compile (Inductor) before the first "
                             "prompt, the weights frozen into it: 10-40 s in every process (SmolLM2), and again "
                             "when a conversation outgrows its 256, 512, ... token bucket; then each token costs "
                             "less (SmolLM2 on 1 thread: int4 about 1.6x, bf16 about 1.9x the eager speed)")


def compile_if_asked(model, compile: bool):
    """``model``, or, with ``--compile``, the compiled model, its step compiled now; a note on stderr says how long
    it took."""
    if not compile:
        return model
    from qkv.generation.compiled import compile_counts, compile_decoder, warm_up
    from qkv.models import model_type_of

    if model_type_of(model) != "decoder":
        print("note: --compile compiles a decoder-only model's step; an encoder-decoder decodes as it is",
              file=sys.stderr, flush=True)
        return model

    print("note: compiling the decode step (--compile) ...", file=sys.stderr, flush=True)
    compiled = compile_decoder(model)
    seconds = warm_up(compiled)
    graphs = compile_counts()["graphs"]
    print(f"note: compiled in {seconds:.0f} s ({graphs} graph{'s' if graphs != 1 else ''})", file=sys.stderr,
          flush=True)
    return compiled


def add_threads(parser: argparse.ArgumentParser, *, every_core: bool = False, help: str | None = None) -> None:
    """``--threads N``: torch's CPU threads for this command (default: torch's choice, or every usable core)."""
    default = "every core this process may use" if every_core else "torch's choice"
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help=help or f"CPU threads for torch (default: {default})")


def check_threads(value: object, where: str = "--threads") -> int:
    """A thread count: a positive whole number, else ``ValueError`` naming ``where`` it came from."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}={value!r} must be a positive whole number of CPU threads, e.g. 2")
    return value


def use_threads(threads: int | None, *, every_core: bool = False) -> int:
    """Set torch's CPU threads for this command, never at import: ``threads`` when given, else every core this
    process may use (``every_core``), else torch's own choice. → the threads torch will use."""
    import torch

    if threads is not None:
        torch.set_num_threads(check_threads(threads))
    elif every_core:
        from qkv.training import usable_cores

        torch.set_num_threads(usable_cores())
    return torch.get_num_threads()


def add_device(parser: argparse.ArgumentParser, *, default: str = "auto", help: str | None = None) -> None:
    """``--device NAME``, checked by ``qkv.devices.resolve_device`` when the command runs."""
    parser.add_argument("--device", default=default, metavar="NAME",
                        help=help or f"where to run: auto (a GPU when there is one), cpu, cuda, cuda:N or mps "
                                     f"(default {default})")


DTYPES = {"fp32": None, "bf16": "bfloat16"}  # None: the weights as loaded (float32 for qkv's checkpoints)


def add_dtype(parser: argparse.ArgumentParser, *, help: str) -> None:
    """``--dtype {fp32,bf16}``: the precision of the weights once loaded (default fp32)."""
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help=help)


def load_dtype(name: str):
    """The ``dtype`` argument of ``qkv.load`` for a ``--dtype`` value: ``torch.bfloat16`` for bf16, None for fp32."""
    import torch

    return None if DTYPES[name] is None else getattr(torch, DTYPES[name])


def add_sampling(parser: argparse.ArgumentParser, *, stop_id_help: str = "the model's end-of-sequence token"
                 ) -> None:
    """How each next token is chosen and when the text stops: the flags ``qkv generate`` and ``qkv chat`` share
    (``--max-new-tokens``, ``--temperature``/``--greedy``, ``--top-k``, ``--top-p``, ``--stop``, ``--seed``, ...)."""
    p = parser
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N", help="at most N new tokens (200)")
    p.add_argument("--min-new-tokens", type=int, default=0, metavar="N", help="never stop before N new tokens")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy; 1 = the model's distribution (0.8)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token (temperature 0)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only")
    p.add_argument("--top-p", type=float, default=1.0, help="sample from the nucleus of probability p (1 = all)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when the text contains TEXT (repeatable); TEXT is not printed")
    p.add_argument("--stop-id", action="append", type=int, default=None, metavar="ID",
                   help=f"stop after token ID (repeatable; default: {stop_id_help})")
    p.add_argument("--seed", type=int, default=None, help="the same seed gives the same text")


def sampling_options(args: argparse.Namespace) -> dict:
    """The ``GenerationConfig`` fields that :func:`add_sampling`'s flags set (``--greedy`` is temperature 0)."""
    return dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty, stop_strings=tuple(args.stop),
                stop_token_ids=None if args.stop_id is None else tuple(args.stop_id), seed=args.seed)


def add_picture(parser: argparse.ArgumentParser, default_out: str, out_help: str) -> None:
    """``--out PNG`` and ``--dpi``: where a picture goes and its resolution (checked by ``qkv.viz.save_figure``)."""
    parser.add_argument("--out", default=default_out, metavar="PNG", help=out_help)
    parser.add_argument("--dpi", type=int, default=110, help="resolution of the PNG (default 110)")


def first_line(text: str | None) -> str:
    """The positional text, else the first non-empty line of stdin."""
    if text is not None:
        return text
    if sys.stdin is None or sys.stdin.isatty():
        raise ValueError("no text given; pass the text as an argument or pipe it in")
    for line in sys.stdin:
        if line.strip():
            return line.rstrip("\n")
    raise ValueError("stdin held no text; pipe in a line of text")


def text_lines(texts: list[str]) -> list[str]:
    """The positional texts, else the non-empty lines of stdin (one text a line)."""
    if texts:
        return list(texts)
    if sys.stdin is None or sys.stdin.isatty():
        raise ValueError("no text given; pass texts as arguments or pipe them in, one per line")
    lines = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not lines:
        raise ValueError("stdin held no text; pipe in one text per line")
    return lines


def query_token(labels: list[str], spec: str) -> int:
    """``--token``'s index among ``labels``: an index, or a word (``qkv.explain.find_token``). A word the tokenizer
    splits (``it`` is ``i``, ``t`` to a character model) stands for its first token: a line on stderr says which,
    so the picture or table is never of another token than the one asked for without a word."""
    from qkv.explain import find_token

    index = find_token(labels, spec)
    found = labels[index].strip().lower().removeprefix("##")  # WordPiece marks a word's continuation with ##
    if not spec.strip().lstrip("-").isdigit() and found != spec.strip().lower():
        print(f"note: --token {spec!r} is several tokens here; using its first, token {index} {labels[index]!r} "
              "(pass an index to choose another)", file=sys.stderr)
    return index


def stdin_lines() -> Iterator[str]:
    """stdin's lines, lazily (each is answered before the next is read), without their line ends."""
    for line in sys.stdin:
        yield line.rstrip("\r\n")
