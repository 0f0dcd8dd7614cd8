"""``qkv study positions``: how far past its training context each positional encoding carries a model.

The same small decoder-only model (same seed, data, steps and size) is trained once per encoding — sinusoidal,
learned, RoPE, ALiBi and none (NoPE) — on windows of L characters of tiny Shakespeare. Then each reads the same
validation text as one long context of L, 2L, 4L and 8L tokens (no sliding window), and the perplexity
exp(mean cross-entropy) is measured over exactly the same predicted tokens at every length.

Evaluating past L: the sinusoidal table, RoPE's rotations and ALiBi's slopes are computed, not learned, so the
trained weights load unchanged into the same model built with a larger ``max_seq_len`` (:func:`extend_context`;
the position buffers are not part of the state dict). A learned table holds one trained vector for each of its
L positions and nothing beyond: there the table says "n/a", and a separate sliding-window table (a window of L
moved by L/2, every token after the first window predicted with at least L/2 tokens of context) shows what
every encoding scores when it never sees a position it was not trained on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import WindowBatches
from ..extras import require
from ..losses import perplexity
from ..models import DecoderLM
from ..training import NextToken, TrainConfig
from .fit import SmallModel, fit, shakespeare, tail_mean
from .report import Progress, StudyResult, finish, pyplot, save_figure

__all__ = ["PositionsSettings", "ENCODINGS", "positions_study", "extend_context", "token_losses",
           "sliding_window_losses"]

ENCODINGS = ("sinusoidal", "learned", "rope", "alibi", "none")
MULTIPLES = (1, 2, 4, 8)


@dataclass(frozen=True)
class PositionsSettings:
    """The model, the training run and the evaluation of the positions study."""

    model: SmallModel = SmallModel(context=128)  # its context is L, the training window
    steps: int = 600
    batch_size: int = 32
    lr: float = 5e-3  # embeddings scaled by sqrt(d_model) start at unit size and move slowly: a large rate
    warmup: int = 50
    eval_spans: int = 24  # validation spans of 8L + 1 tokens, evenly spaced; every length predicts the same ones

    @property
    def context(self) -> int:
        return self.model.context


FULL = PositionsSettings()
QUICK = PositionsSettings(SmallModel(context=32, d_model=32, n_heads=2, n_layers=1, d_ff=128), steps=150,
                          batch_size=16, lr=1e-2, warmup=10, eval_spans=4)


def extend_context(model: DecoderLM, max_seq_len: int) -> DecoderLM:
    """The same trained model, built for ``max_seq_len`` positions: its weights loaded into a larger model.

    Sinusoidal, RoPE and ALiBi positions are computed from the position index (buffers outside the state dict)
    and no encoding at all has nothing to extend, so the result equals ``model`` on every input ``model``
    accepts and reads longer ones too. Raises ValueError for learned positions, which have no vector past the
    trained table.
    """
    config = model.config
    if config.positional == "learned" and max_seq_len > config.max_seq_len:
        raise ValueError(f"learned positions hold a trained vector for each of max_seq_len={config.max_seq_len} "
                         f"positions and none beyond, so no model of this one reads {max_seq_len} tokens; "
                         "evaluate longer text with a sliding window of max_seq_len tokens instead")
    longer = DecoderLM(config.replace(max_seq_len=max_seq_len))
    longer.load_state_dict(model.state_dict())
    return longer.eval()


@torch.no_grad()
def token_losses(model: DecoderLM, inputs: Tensor, targets: Tensor, batch_size: int = 8) -> Tensor:
    """-log P(target_t | inputs_≤t) for every position: inputs, targets (n, T) → losses (n, T) in nats."""
    out = []
    for i in range(0, inputs.shape[0], batch_size):
        logits = model(inputs[i:i + batch_size]).float()
        out.append(F.cross_entropy(logits.transpose(1, 2), targets[i:i + batch_size], reduction="none"))
    return torch.cat(out)


@torch.no_grad()
def sliding_window_losses(model: DecoderLM, inputs: Tensor, targets: Tensor, window: int, stride: int) -> Tensor:
    """Per-token losses (n, T) where the model never reads more than ``window`` tokens: windows start every
    ``stride`` tokens; the first scores all its targets, each later one only those past the previous window."""
    n, length = inputs.shape
    losses = torch.empty(n, length)
    start, scored = 0, 0  # scored: targets [0, scored) have their loss
    while scored < length:
        end = min(start + window, length)
        piece = token_losses(model, inputs[:, start:end], targets[:, start:end])
        losses[:, scored:end] = piece[:, scored - start:]
        scored = end
        start = min(start + stride, max(0, length - window)) if end < length else end
    return losses


def _spans(val: Tensor, n_spans: int, span: int) -> Tensor:
    """``n_spans`` windows of ``span`` tokens at evenly spaced offsets of the validation split: (n_spans, span)."""
    if len(val) < span:
        raise ValueError(f"the validation split holds {len(val)} tokens, fewer than one span of {span}; "
                         "use a smaller context")
    starts = torch.linspace(0, len(val) - span, n_spans).long()
    return torch.stack([val[s:s + span] for s in starts.tolist()])


def positions_study(*, quick: bool = False, out_dir: str | Path = "runs/study", seed: int = 0,
                    progress: bool = True, settings: PositionsSettings | None = None) -> StudyResult:
    """Train one model per encoding, measure perplexity at L..8L, write ``<out_dir>/positions/``; → the result.

    Tables: ``long context`` (one row per encoding, perplexity at each length, None where the encoding cannot
    reach it), ``sliding window`` (the same lengths read L tokens at a time), ``training``. Figures: perplexity
    against evaluation length, and loss against position inside the 8L window.
    """
    s = settings or (QUICK if quick else FULL)
    started, cpu_started = time.perf_counter(), time.process_time()
    out = Path(out_dir) / "positions"
    tokenizer, splits = shakespeare()
    longest = MULTIPLES[-1] * s.context
    spans = _spans(torch.from_numpy(splits.val.astype("int64")), s.eval_spans, longest + 1)
    train_data = WindowBatches(splits.train, s.context + 1, s.batch_size, seed=seed)
    objective = NextToken(tokenizer, TrainConfig(max_steps=s.steps))

    long_rows, sliding_rows, train_rows = [], [], []
    curves: dict[str, Tensor] = {}  # encoding → mean loss at each position of its longest window
    lengths = [m * s.context for m in MULTIPLES]
    eval_units = len(lengths) * 2
    with Progress(len(ENCODINGS) * (s.steps + eval_units), "qkv study positions", enabled=progress) as bar:
        for kind in ENCODINGS:
            torch.manual_seed(seed)
            model = DecoderLM(s.model.config(kind, tokenizer.vocab_size))
            t0 = time.perf_counter()
            losses = fit(model, objective, train_data, steps=s.steps, lr=s.lr, warmup=s.warmup, seed=seed,
                         on_step=lambda step, loss, k=kind: bar.update(1, f"{k} loss {loss:.3f}"))
            train_rows.append({"encoding": kind, "parameters": model.num_parameters(),
                               "train loss (last 10% of steps)": tail_mean(losses),
                               "seconds": round(time.perf_counter() - t0, 1)})
            long_row, sliding_row = {"encoding": kind}, {"encoding": kind}
            reachable = longest if kind != "learned" else s.context
            reader = extend_context(model, reachable)
            for length in lengths:
                inputs = spans[:, :-1].reshape(-1, length)
                targets = spans[:, 1:].reshape(-1, length)
                column = _column(length, s.context)
                if length <= reachable:
                    per_token = token_losses(reader, inputs, targets)
                    long_row[column] = perplexity(float(per_token.mean()))
                    if length == reachable:
                        curves[kind] = per_token.mean(dim=0)
                else:
                    long_row[column] = None
                bar.update(1, f"{kind} at {length}")
                sliding = sliding_window_losses(model, inputs, targets, s.context, s.context // 2)
                sliding_row[column] = perplexity(float(sliding.mean()))
                bar.update(1, f"{kind} sliding at {length}")
            long_rows.append(long_row)
            sliding_rows.append(sliding_row)

    result = StudyResult(
        name="positions", quick=quick,
        title="Length extrapolation: perplexity at L, 2L, 4L and 8L tokens, one model per positional encoding",
        settings={"data": "tiny Shakespeare, characters", "training context L": s.context,
                  "model": f"decoder, {s.model.describe()}, embeddings x sqrt(d_model)",
                  "steps": s.steps, "batch": s.batch_size, "lr": s.lr, "seed": seed,
                  "evaluation": f"{s.eval_spans} validation spans x {longest} predicted tokens, the same at every "
                                "length", "threads": torch.get_num_threads()},
        tables={"long context": long_rows, "sliding window": sliding_rows, "training": train_rows},
        captions={
            "long context": "Validation perplexity reading the text as one context of each length (lower is "
                            f"better). n/a: a learned table has vectors for positions 0..{s.context - 1} only.",
            "sliding window": f"The same tokens read by a window of L={s.context} moved {s.context // 2} at a "
                              "time: no position past the training context is ever used.",
            "training": "Every model saw the same batches in the same order from the same initial weights "
                        "(apart from the positional table).",
        },
    )
    return finish(result, out, lambda d: [
        _plot_lengths(long_rows, sliding_rows, lengths, s.context, d / "perplexity-vs-length.png"),
        _plot_positions(curves, s.context, d / "loss-vs-position.png")], (started, cpu_started))


def _column(length: int, context: int) -> str:
    multiple = length // context
    return f"{multiple if multiple > 1 else ''}L={length}"



COLOURS = {"sinusoidal": "tab:blue", "learned": "tab:orange", "rope": "tab:green", "alibi": "tab:red",
           "none": "tab:purple"}


def matplotlib_ticker():
    return require("matplotlib.ticker", "the study's figures")


def _plot_lengths(long_rows: list[dict], sliding_rows: list[dict], lengths: list[int], context: int,
                  path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for row, sliding in zip(long_rows, sliding_rows, strict=True):
        kind = row["encoding"]
        points = [(n, row[_column(n, context)]) for n in lengths if row[_column(n, context)] is not None]
        ax.plot(*zip(*points, strict=True), "o-", color=COLOURS[kind], label=kind, linewidth=2)
        if kind == "learned":
            ax.plot(lengths, [sliding[_column(n, context)] for n in lengths], "o--", color=COLOURS[kind],
                    alpha=0.6, label="learned, sliding window of L")
    ax.axvline(context, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"{n}\n({n // context}L)" if n > context else f"{n}\n(L)" for n in lengths])
    low, high = ax.get_ylim()
    scale = "log" if high > 3 * low else "linear"  # a log axis over less than a factor 3 shows no tick at all
    if scale == "log":
        ax.set_yscale("log")
        low, high = ax.get_ylim()
        ticks = [t * 10.0 ** e for e in range(-1, 5) for t in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8)]
        ax.set_yticks([t for t in ticks if low <= t <= high], [f"{t:g}" for t in ticks if low <= t <= high])
        ax.yaxis.set_minor_formatter(matplotlib_ticker().NullFormatter())
    ax.set_xlabel("evaluation context (tokens, one long window)")
    ax.set_ylabel(f"validation perplexity ({scale} scale)")
    ax.set_title(f"Length extrapolation: trained on {context}-token windows")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=9)
    return save_figure(fig, path)


def _plot_positions(curves: dict[str, Tensor], context: int, path: Path, smooth: int | None = None) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    smooth = smooth or max(1, context // 8)
    for kind, curve in curves.items():
        kernel = torch.ones(1, 1, smooth) / smooth
        smoothed = F.conv1d(curve.view(1, 1, -1), kernel).view(-1)  # mean of each run of `smooth` positions
        x = torch.arange(len(smoothed)) + (smooth - 1) / 2
        ax.plot(x.tolist(), smoothed.tolist(), color=COLOURS[kind], label=kind, linewidth=1.8)
    ax.axvline(context, color="grey", linestyle=":", linewidth=1)
    low, high = ax.get_ylim()
    ax.text(context, low + 0.03 * (high - low), " end of the training context L", fontsize=9, color="grey")
    ax.set_xlabel("position inside the window (tokens)")
    ax.set_ylabel("validation loss (nats per token)")
    ax.set_title(f"Where each encoding breaks: loss at each position (mean of {smooth})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    return save_figure(fig, path)
