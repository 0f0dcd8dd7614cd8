"""``qkv study scale``: what the forgotten 1/sqrt(d_k) in softmax(QK^T / sqrt(d_k)) V does.

"Attention Is All You Need", section 3.2.1: "for large values of d_k, the dot products grow large in magnitude,
pushing the softmax function into regions where it has extremely small gradients. To counteract this effect, we
scale the dot products by 1/sqrt(d_k)." (Footnote 4: if the components of q and k are independent with mean 0
and variance 1, q·k has mean 0 and variance d_k.)

Two measurements:

- at initialisation, for d_k = 16 .. 512: queries, keys and values with unit-variance entries (the footnote's
  assumption) through :func:`qkv.attention.scaled_dot_product_attention` with and without the scale — the
  attention weights' entropy, the largest weight in each row (saturation), the share of rows whose largest
  weight exceeds 0.99, and the norm of the gradient reaching the scores through the softmax,
  ∂L/∂s = w ⊙ (u - Σ_j w_j u_j) with u = ∂L/∂w; beside them the entropy in a freshly built qkv model
  (LayerNorm'd inputs, projections initialised at ``init_std``), where the projections start small;
- the same q, k, v in bfloat16: how far its rounding moves the attention weights, and whether any come out
  NaN or infinite;
- a short training run of a small decoder on tiny Shakespeare with and without the scale, at one learning rate,
  with qkv's initialisation (``init_std`` 0.02, GPT-2's) and with the paper's (Xavier: ``init_std`` =
  d_model^-0.5, so q and k start with unit-variance entries); in fp32, and with ``bf16=True`` in bf16 too.

The model without the scale is an ordinary qkv model whose positional encoding is wrapped by
:class:`WithoutScale`: it multiplies queries and keys by d_k^(1/4) right before the product (through the hook
RoPE uses to rotate them), so (d_k^(1/4) q)·(d_k^(1/4) k) / sqrt(d_k) = q·k — softmax(QK^T) exactly, in the
forward and the backward pass.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..attention import scaled_dot_product_attention
from ..config import ModelConfig
from ..data import WindowBatches
from ..models import DecoderLM
from ..positions import PositionalEncoding
from ..training import NextToken, TrainConfig
from .fit import fit, shakespeare, tail_mean
from .report import Progress, StudyResult, finish, pyplot, save_figure

BF16_KEYS = ("largest |score|", "bf16 weight error", "bf16 non-finite")

__all__ = ["ScaleSettings", "scale_study", "WithoutScale", "without_scale", "attention_at_init",
           "model_attention_entropy"]


class WithoutScale(PositionalEncoding):
    """A model's positional encoding plus q, k → d_k^(1/4)·q, d_k^(1/4)·k: attention without 1/sqrt(d_k)."""

    def __init__(self, inner: PositionalEncoding, d_k: int):
        super().__init__(inner.max_positions)
        self.inner = inner
        self.kind = inner.kind
        self.factor = d_k ** 0.25

    def embed(self, x: Tensor, positions: Tensor) -> Tensor:
        return self.inner.embed(x, positions)

    def rotary(self, positions: Tensor, limit: int | None = None) -> Callable[[Tensor], Tensor]:
        rotate, factor = self.inner.rotary(positions, limit), self.factor
        if rotate is None:
            return lambda x: x * factor
        return lambda x: rotate(x) * factor

    def attention_bias(self, n_queries: int, n_keys: int, device: torch.device, **positions: Tensor | None
                       ) -> Tensor | None:
        return self.inner.attention_bias(n_queries, n_keys, device, **positions)

    def table(self, n_positions: int) -> Tensor | None:
        return self.inner.table(n_positions)


def without_scale(model: DecoderLM) -> DecoderLM:
    """The model, changed in place to compute softmax(QK^T) V in every layer; → the model."""
    model.embed.positional = WithoutScale(model.embed.positional, model.config.d_k)
    return model


def attention_at_init(d_k: int, *, scaled: bool, n_keys: int = 128, n_rows: int = 1024,
                      generator: torch.Generator) -> dict[str, float]:
    """Unit-variance q, k, v ``(n_rows / n_keys, 1, n_keys, d_k)`` through scaled_dot_product_attention →
    mean entropy of a row of weights (nats), mean largest weight, share of rows above 0.99, and the mean norm
    of ∂L/∂scores per row for L = Σ out ⊙ g, g with entries N(0, 1/d_k) (so g·v has unit variance); and, the
    same q, k, v in bfloat16, the largest |score| and the largest change of any weight against float32."""
    batch = max(1, n_rows // n_keys)
    q, k, v = (torch.randn(batch, 1, n_keys, d_k, generator=generator) for _ in range(3))
    g = torch.randn(batch, 1, n_keys, d_k, generator=generator) / math.sqrt(d_k)
    scale = None if scaled else 1.0
    _, weights = scaled_dot_product_attention(q, k, v, scale=scale)
    entropy = -torch.special.xlogy(weights, weights).sum(-1)  # (batch, 1, n_keys)
    largest = weights.max(-1).values
    u = g @ v.transpose(-2, -1)  # ∂L/∂w_ij = g_i · v_j
    grad_scores = weights * (u - (weights * u).sum(-1, keepdim=True))  # the softmax's backward
    _, weights_bf16 = scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), scale=scale)
    scores = (q @ k.transpose(-2, -1)) * (d_k ** -0.5 if scaled else 1.0)
    return {"entropy": float(entropy.mean()), "largest weight": float(largest.mean()),
            "rows > 0.99": float((largest > 0.99).float().mean()),
            "grad at scores": float(grad_scores.norm(dim=-1).mean()),
            "largest |score|": float(scores.abs().max()),
            "bf16 weight error": float((weights_bf16.float() - weights).abs().max()),
            "bf16 non-finite": int((~torch.isfinite(weights_bf16)).sum())}


@torch.no_grad()
def model_attention_entropy(d_k: int, *, scaled: bool, init_std: float, n_keys: int = 128, seed: int = 0) -> float:
    """Mean entropy of the first layer's attention rows in a fresh one-head qkv decoder with d_model = d_k, on
    random tokens (causal: row t spreads over t + 1 keys at most)."""
    torch.manual_seed(seed)
    model = DecoderLM(ModelConfig(vocab_size=64, d_model=d_k, n_heads=1, d_ff=4 * d_k, n_decoder_layers=1,
                                  max_seq_len=n_keys, positional="none", init_std=init_std)).eval()
    if not scaled:
        without_scale(model)
    ids = torch.randint(0, 64, (4, n_keys), generator=torch.Generator().manual_seed(seed))
    _, attentions = model(ids, return_attention=True)
    weights = attentions[0]
    return float(-torch.special.xlogy(weights, weights).sum(-1).mean())


@dataclass(frozen=True)
class ScaleSettings:
    d_ks: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
    n_keys: int = 128
    n_rows: int = 4096
    # the training runs
    d_model: int = 128
    n_heads: int = 1  # d_k = d_model: one wide head, where the scale matters most
    n_layers: int = 2
    context: int = 64
    batch_size: int = 16
    steps: int = 200
    lr: float = 3e-3
    warmup: int = 20
    # bf16 training runs too. Off by default: on a CPU without bf16 matrix units (AVX512_BF16, AMX) a bf16
    # autocast step of this model took 3.3 s against 0.25 s in fp32 (measured on 2-core AMD EPYC, one thread).
    bf16: bool = False

    @property
    def d_k(self) -> int:
        return self.d_model // self.n_heads


FULL = ScaleSettings()
QUICK = ScaleSettings(n_keys=64, n_rows=512, d_model=64, n_layers=1, context=32, batch_size=8, steps=40, bf16=False)


def scale_study(*, quick: bool = False, out_dir: str | Path = "runs/study", seed: int = 0, progress: bool = True,
                bf16: bool | None = None, settings: ScaleSettings | None = None) -> StudyResult:
    """Measure attention with and without 1/sqrt(d_k) at initialisation and in training; write
    ``<out_dir>/scale/``; → the result with tables ``at initialisation``, ``in a qkv model at initialisation``,
    ``in bf16 at initialisation`` and ``training``. ``bf16=True`` adds bf16-autocast training runs."""
    s = settings or (QUICK if quick else FULL)
    if bf16 is not None:
        s = dataclasses.replace(s, bf16=bf16)
    started, cpu_started = time.perf_counter(), time.process_time()
    out = Path(out_dir) / "scale"
    inits = {"qkv (std 0.02)": 0.02, "paper (Xavier)": s.d_model ** -0.5}
    dtypes = ("fp32", "bf16") if s.bf16 else ("fp32",)
    runs = [(init, dtype, scaled) for init in inits for dtype in dtypes for scaled in (True, False)]
    init_rows, model_rows, bf16_rows = [], [], []
    curves: dict[str, list[float]] = {}
    train_rows = []
    with Progress(len(s.d_ks) + len(runs) * s.steps, "qkv study scale", enabled=progress) as bar:
        for d_k in s.d_ks:
            row, model_row, bf16_row = {"d_k": d_k}, {"d_k": d_k}, {"d_k": d_k}
            for scaled in (True, False):
                tag = "with 1/sqrt(d_k)" if scaled else "without"
                measured = attention_at_init(d_k, scaled=scaled, n_keys=s.n_keys, n_rows=s.n_rows,
                                             generator=torch.Generator().manual_seed(seed + d_k))
                for name, value in measured.items():
                    (bf16_row if name in BF16_KEYS else row)[f"{name}, {tag}"] = value
                model_row[f"entropy, {tag}"] = model_attention_entropy(d_k, scaled=scaled, init_std=0.02,
                                                                       n_keys=s.n_keys, seed=seed)
            init_rows.append(row)
            model_rows.append(model_row)
            bf16_rows.append(bf16_row)
            bar.update(1, f"d_k {d_k}")

        tokenizer, splits = shakespeare()
        data = WindowBatches(splits.train, s.context + 1, s.batch_size, seed=seed)
        val = WindowBatches(splits.val, s.context + 1, s.batch_size, seed=seed).fixed(8)
        objective = NextToken(tokenizer, TrainConfig(max_steps=s.steps))
        for init, dtype, scaled in runs:
            label = f"{init}, {dtype}, {'with' if scaled else 'without'} 1/sqrt(d_k)"
            torch.manual_seed(seed)
            model = DecoderLM(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=s.d_model, n_heads=s.n_heads,
                                          d_ff=4 * s.d_model, n_decoder_layers=s.n_layers, max_seq_len=s.context,
                                          positional="learned", init_std=inits[init]))
            if not scaled:
                without_scale(model)
            t0 = time.perf_counter()
            losses = fit(model, objective, data, steps=s.steps, lr=s.lr, warmup=s.warmup, seed=seed,
                         bf16=dtype == "bf16", on_step=lambda step, loss, n=label: bar.update(1, n))
            bar.update(s.steps - len(losses))
            diverged = len(losses) < s.steps
            curves[label] = losses
            val_loss = math.nan if diverged else _evaluate(model, objective, val, dtype == "bf16")
            train_rows.append({"init": init, "dtype": dtype, "scale": "1/sqrt(d_k)" if scaled else "none",
                               "loss at step 50": _at(losses, 50), "final train loss": tail_mean(losses),
                               "val loss": val_loss,
                               "diverged at step": len(losses) if diverged else None,
                               "largest attention weight (mean)": None if diverged else _saturation(model, val),
                               "seconds": round(time.perf_counter() - t0, 1)})

    result = StudyResult(
        name="scale", quick=quick,
        title="The attention scale: softmax(QK^T / sqrt(d_k)) against softmax(QK^T)",
        settings={"at initialisation": f"q, k, v entries N(0, 1), {s.n_keys} keys, {s.n_rows} query rows per d_k",
                  "training": f"tiny Shakespeare characters, decoder {s.n_layers} layers, d_model {s.d_model}, "
                              f"{s.n_heads} head(s) (d_k {s.d_k}), context {s.context}, batch {s.batch_size}, "
                              f"{s.steps} steps, lr {s.lr} (warm-up {s.warmup}, cosine), AdamW, clip 1.0",
                  "seed": seed, "threads": torch.get_num_threads()},
        tables={"at initialisation": init_rows, "in a qkv model at initialisation": model_rows,
                "in bf16 at initialisation": bf16_rows, "training": train_rows},
        captions={
            "at initialisation": f"Entropy in nats (uniform over {s.n_keys} keys: {math.log(s.n_keys):.2f}); "
                                 "largest weight: mean over rows of max_j w_ij; grad at scores: mean norm of "
                                 "∂L/∂s per row.",
            "in a qkv model at initialisation": "The first layer of a fresh one-head qkv decoder with d_model = d_k "
                                                "(LayerNorm'd inputs, projections at init_std 0.02, causal) on "
                                                "random tokens: entropy of its attention rows in nats.",
            "in bf16 at initialisation": "The same q, k, v as the first table, in bfloat16: the largest |score| "
                                         "(in float32), the largest change of any attention weight against "
                                         "float32, and how many weights came out NaN or infinite.",
            "training": "Cross-entropy in nats per character; diverged: the step whose loss or gradient was not "
                        "finite (n/a: never); largest attention weight: mean over rows, layers and validation "
                        "batches after training.",
        },
    )
    return finish(result, out, lambda d: [_plot_init(init_rows, s, d / "saturation-vs-dk.png"),
                      _plot_training(curves, s, d / "training-loss.png")],
                  (started, cpu_started))


@torch.no_grad()
def _evaluate(model: DecoderLM, objective: NextToken, batches: list[Tensor], bf16: bool) -> float:
    total = 0.0
    for i, batch in enumerate(batches):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = objective.loss(model, batch, torch.Generator().manual_seed(i))
        total += float(loss)
    return total / len(batches)


@torch.no_grad()
def _saturation(model: DecoderLM, batches: list[Tensor]) -> float:
    values = []
    for batch in batches:
        _, attentions = model(batch[:, :-1], return_attention=True)
        values += [float(w.max(-1).values.mean()) for w in attentions]
    return sum(values) / len(values)


def _at(losses: list[float], step: int) -> float | None:
    window = losses[max(0, step - 5):step + 5]
    return sum(window) / len(window) if len(losses) > step else None



def _plot_init(rows: list[dict], s: ScaleSettings, path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    d_ks = [r["d_k"] for r in rows]
    panels = (("entropy", "entropy of a row (nats)"), ("largest weight", "largest weight in a row"),
              ("grad at scores", "‖∂L/∂scores‖ per row"))
    for ax, (key, ylabel) in zip(axes, panels, strict=True):
        ax.plot(d_ks, [r[f"{key}, with 1/sqrt(d_k)"] for r in rows], "o-", color="tab:blue",
                label="with 1/sqrt(d_k)", linewidth=2)
        ax.plot(d_ks, [r[f"{key}, without"] for r in rows], "s--", color="tab:red", label="without",
                linewidth=2)
        if key == "entropy":
            ax.axhline(math.log(s.n_keys), color="grey", linestyle=":", linewidth=1)
            ax.text(d_ks[0], math.log(s.n_keys), f"uniform over {s.n_keys} keys", va="bottom", fontsize=8,
                    color="grey")
        ax.set_xscale("log", base=2)
        ax.set_xticks(d_ks, [str(d) for d in d_ks])
        ax.set_xlabel("d_k (dimensions per head)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=9)
    axes[0].set_ylim(bottom=0)
    axes[1].set_ylim(0, 1.02)
    axes[2].set_ylim(bottom=0)
    fig.suptitle("Attention at initialisation (q, k, v entries N(0, 1)): without the scale the softmax saturates",
                 fontsize=12)
    return save_figure(fig, path)


def _plot_training(curves: dict[str, list[float]], s: ScaleSettings, path: Path, smooth: int = 10) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colours = {"qkv (std 0.02)": "tab:blue", "paper (Xavier)": "tab:red"}
    for label, losses in curves.items():
        init, dtype, scale = label.split(", ")
        colour = colours[init]
        style = ("-" if scale.startswith("with ") else "--") if dtype == "fp32" else (
            "-." if scale.startswith("with ") else ":")
        values = torch.tensor(losses)
        if len(values) >= smooth:
            values = torch.nn.functional.avg_pool1d(values.view(1, 1, -1), smooth, stride=1).view(-1)
        x = torch.arange(len(values)) + (smooth - 1) / 2 if len(losses) >= smooth else torch.arange(len(values))
        ax.plot(x.tolist(), values.tolist(), style, color=colour, label=label, linewidth=1.6)
        if len(losses) < s.steps:
            ax.plot([len(losses) - 1], [values[-1].item()], "x", color=colour, markersize=10)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"training loss (nats per character, mean of {smooth} steps)")
    ax.set_title(f"Training with (solid) and without (dashed) 1/sqrt(d_k): d_k = {s.d_k}, lr {s.lr}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
