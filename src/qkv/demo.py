"""``make demo``: a character-level Transformer learns tiny Shakespeare on this CPU in three minutes.

Trains a small ``DecoderLM`` for 180 s by the trainer's clock (set-up excluded) on 2 CPU threads, prints how the
validation loss fell, writes text one character at a time, and draws where one attention head looks in a
sample sentence. Everything lands in ``runs/demo/``: the checkpoint, metrics.csv, loss.png, attention.png.
"""

from __future__ import annotations

import argparse
import collections
import math
import shutil
import sys
from pathlib import Path

import torch

import qkv
from qkv.attention import causal_mask
from qkv.config import ModelConfig
from qkv.data import read_corpus
from qkv.evaluation import evaluate_checkpoint
from qkv.generation import generate_text
from qkv.recipes.language_model import train_language_model as train
from qkv.training import TrainConfig, fastest_cpu_settings
from qkv.viz import attention_heatmap, save_figure

SAMPLE_SENTENCE = "To be, or not to be, that is the question."
PROMPT = "ROMEO:\n"

# The demo's model and recipe, tuned for quality per second on 2 CPU cores (measured figures: docs/results/demo.md).
DEMO_MODEL = ModelConfig(
    vocab_size=65, d_model=128, n_heads=4, d_ff=512, n_encoder_layers=0, n_decoder_layers=4, max_seq_len=64,
    dropout=0.0, activation="gelu", norm_position="pre", positional="rope", tie_embeddings=True,
)
DEMO_TRAIN = dict(
    batch_size=16, lr=4e-3, schedule="cosine", warmup_steps=30, min_lr_ratio=0.1, weight_decay=0.1, beta1=0.9,
    beta2=0.99, grad_clip=1.0, eval_every=10**9, eval_seconds=15.0, eval_batches=8, final_eval_batches=1000,
    save_every=0, log_every=10, seed=1337,
)


def unigram_entropy(text: str) -> float:
    """H = -Σ_c p(c) log p(c): the loss of a model that knows letter frequencies and nothing else."""
    counts = collections.Counter(text)
    return -sum(n / len(text) * math.log(n / len(text)) for n in counts.values())


def loss_at(history: list[dict], seconds: float) -> dict | None:
    """The first evaluation at or after ``seconds`` on the trainer's clock."""
    return next((h for h in history if h["elapsed_s"] >= seconds), None)


def write(model, tokenizer, prompt: str, n_chars: int, *, temperature: float = 0.8, seed: int = 0) -> str:
    """``prompt`` and ``n_chars`` characters sampled after it; past the context (64 characters) the model reads a
    sliding window of the most recent text (``qkv.generation``'s text helpers, as ``qkv generate`` does)."""
    return prompt + generate_text(model, tokenizer, prompt, n_chars, temperature=temperature, seed=seed)


def qkv_command() -> str:
    """``qkv`` as it can be typed in this shell: ``qkv`` when that name on PATH is this environment's, else the
    path of this environment's script (``.venv/bin/qkv`` after ``make demo``: nothing activates the venv), else
    ``python -m qkv`` with this Python's path."""
    script = Path(sys.executable).parent / "qkv"
    found = shutil.which("qkv")
    if found and script.is_file() and Path(found).resolve() == script.resolve():
        return "qkv"
    if script.is_file():
        return _as_typed(script)
    return f"{sys.executable} -m qkv"


def _as_typed(path: Path) -> str:
    """A path relative to the current directory when it lies under it (``.venv/bin/qkv``), else absolute."""
    path = path.absolute()
    return str(path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path)


def _threads(value: str) -> str | int:
    """--threads: 'auto' or a positive whole number."""
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a thread count: pass a whole number >= 1, or auto")
    return int(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--time-budget", type=float, default=180.0, help="seconds of training (default 180)")
    parser.add_argument("--threads", default="auto", type=_threads,
                        help="CPU threads, or 'auto' (default): chosen with --dtype by timing a few steps")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"),
                        help="fp32, bf16 (autocast), or 'auto' (default): whichever trains faster on this CPU")
    parser.add_argument("--sample-length", type=int, default=500)
    parser.add_argument("--final-eval-batches", type=int, default=1000,
                        help="batches of windows for the final validation loss (default: the whole split)")
    args = parser.parse_args(argv)
    threads, dtype = args.threads, args.dtype
    if "auto" in (threads, dtype):
        (threads, dtype), rates = fastest_cpu_settings(
            DEMO_MODEL, DEMO_TRAIN["batch_size"], threads=None if threads == "auto" else (threads,),
            dtypes=("fp32", "bf16") if dtype == "auto" else (dtype,))
        measured = " | ".join(f"{n} thread{'s' * (n > 1)} {d} {rate:,.0f}" for (n, d), rate in rates.items())
        print(f"set-up check, training tokens/s: {measured}")
    torch.set_num_threads(threads)
    precision = "bf16 autocast" if dtype == "bf16" else "fp32"

    out = Path(args.out)
    print(f"qkv demo: a character-level Transformer learns tiny Shakespeare in {args.time_budget:.0f} s "
          f"(trainer's clock) on {threads} CPU thread(s), {precision}")
    options = {**DEMO_TRAIN, "final_eval_batches": args.final_eval_batches}
    result = train(DEMO_MODEL, TrainConfig(time_budget=args.time_budget, device="cpu", dtype=dtype, **options),
                   out_dir=out, overwrite=True)

    baseline = unigram_entropy(read_corpus().text)
    print(f"\nvalidation loss (nats per character; letter frequencies alone give {baseline:.2f}):")
    for mark in (15, 30, 60, 90, 120, 150):
        h = loss_at(result.history[:-1], mark)
        if h is not None and mark < result.elapsed:
            print(f"  at {h['elapsed_s']:6.1f} s  {h['val_loss']:.3f}")
    print(f"  at {result.elapsed:6.1f} s  {result.val_loss:.3f}  (final; "
          f"{result.step} steps, {result.tokens_per_s:,.0f} tokens/s)")
    if dtype == "bf16":  # the evaluations above ran under bf16 autocast, as the training did
        fp32 = evaluate_checkpoint(out, batch_size=DEMO_TRAIN["batch_size"],
                                   max_batches=args.final_eval_batches)["loss"]
        print(f"  the final weights evaluated in fp32: {fp32:.3f}")

    model, tokenizer = qkv.load(out)
    text = write(model, tokenizer, PROMPT, args.sample_length)
    print(f"\nsample (temperature 0.8, prompt {PROMPT!r}):\n{'-' * 60}\n{text}\n{'-' * 60}")

    ids = torch.tensor([tokenizer.encode(SAMPLE_SENTENCE)])
    with torch.no_grad():
        _, attentions = model(ids, return_attention=True)
    layer = len(attentions) - 1
    weights = attentions[layer][0]  # (heads, query, key)
    entropy = -(weights * weights.clamp_min(1e-9).log()).sum(-1).mean(-1)  # per head: how focused it is
    head = int(entropy.argmin())
    pieces = tokenizer.pieces(SAMPLE_SENTENCE)
    picture = save_figure(attention_heatmap(weights[head], pieces, mask=causal_mask(len(pieces)),
                                            title=f"layer {layer}, head {head} (the most focused head; "
                                                  "counting from 0)"),
                          out / "attention.png")
    print(f"\nwrote {out / 'loss.png'} (loss curve), {picture} (layer {layer}, head {head} on "
          f"{SAMPLE_SENTENCE!r}), checkpoint {result.checkpoint}")
    qkv_cli = qkv_command()
    print(f"more: {qkv_cli} generate --checkpoint {out} {PROMPT.strip()!r}   |   {qkv_cli} eval --checkpoint {out}")
    activate = Path(sys.executable).parent / "activate"
    if qkv_cli != "qkv" and activate.is_file():
        print(f"      (or `source {_as_typed(activate)}` once: then plain `qkv ...` works, as the guides type it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
