"""``qkv study scaling``: loss against parameters, data and compute, measured on this machine.

The question the articles' last table leaves open — a mini Transformer and a modern LLM share "the math and the
ideas", so what does size buy? — is what scaling laws answer (Kaplan et al. 2020; Hoffmann et al. 2022). This
study measures one on the bundled text:

- **data**: characters of all the bundled text (tiny Shakespeare, and every English sentence of the two Tatoeba
  zips once, each followed by all its French and German translations), read from the zips in place; a fixed
  held-out split (the last 5% of Shakespeare and the sentences whose hash falls in 1/20), :func:`scaling_corpus`;
- **models**: decoders from a ladder of shapes (:data:`LADDER`, each about 2x the parameters of the one before),
  pre-LN, RoPE, no dropout, d_ff = 4·d_model, heads of 32 dimensions; 6 consecutive rungs are chosen so that every
  budget's best size is predicted to sit inside them, 2 rungs or more on each side (the prior: Chinchilla's
  fitted L(N, D), reading 4 characters as one of its word-pieces, until this corpus has its own);
- **budgets**: 4 compute budgets C, each 2.15x the one before, sized from the training throughput measured at the
  start so the whole study fits ``--budget-hours`` (:func:`plan_study`); a plan that would read the training text
  more than 4 times (Muennighoff et al. 2023: up to about 4 epochs repeated data is worth nearly as much as new)
  or leave a budget's valley without 2 widths on each side is refused before anything trains;
- **runs** (Hägele et al. 2024): each width trains once at a constant learning rate after a short warm-up; at
  80% of each budget's tokens a copy branches off and cools down over the last 20% with lr·(1 − sqrt(t)), then
  is evaluated on the held-out text. The learning rate is chosen per width by a small sweep at the smallest
  budget (the best candidate's run continues as that width's run);
- **compute**: :func:`flops_per_token` (nanochat's count: 6 × the matmul weights, the output layer included, plus
  12·L·d·T for attention), N both without embeddings (:func:`parameter_counts`, Kaplan's N, what the laws use)
  and with them;
- **fits** (:mod:`qkv.study.laws`): a parabola in ln N per budget → N_opt(C), D_opt(C) as power laws; the
  parametric L(N, D) = E + A/N^α + B/D^β fitted as Besiroglu et al. 2024 did, with bootstrap intervals.

The study is a list of units of work — (width, learning-rate candidate) for the sweep, then (width, budget)
branches, budget by budget — written to ``<out>/scaling/`` as each finishes (``points.json``) beside the plan
(``plan.json``) and each width's constant-rate checkpoint. Killed, it continues from the last finished unit and
the width's last checkpoint when the same command runs again, with the same results.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checkpoint import write_atomic
from ..config import ModelConfig
from ..data import TokenSplits, WindowBatches, cache_dir, read_parallel
from ..extras import require
from ..models import DecoderLM, Encoder, Transformer
from ..positions import PositionalEncoding
from ..tokenizers import Tokenizer
from ..training import NextToken, TrainConfig, adamw_kernel, param_groups
from . import laws
from .report import Progress, StudyResult, finish, markdown_table, pyplot, save_figure

__all__ = ["ScalingSettings", "FULL", "QUICK", "LADDER", "PlanRefused", "scaling_study", "plan_study",
           "flops_per_token", "parameter_counts", "matmul_parameters", "shape_config", "scaling_corpus",
           "measure_throughput", "PRESETS_PLACED", "TATOEBA_ZIPS"]

TATOEBA_ZIPS = ("data/tatoeba-fra-eng-2017-09-29.zip", "data/tatoeba-deu-eng-2018-04-07.zip")
CORPUS_FORMAT = 1  # bump when the text built from the files changes: the cached token files follow

# (layers, d_model): each rung about 2x (1.8-2.3x) the non-embedding parameters of the one before, d_model/layers
# between 24 and 96, so depth and width grow together (3.3k to 39M parameters)
LADDER: tuple[tuple[int, int], ...] = ((1, 16), (1, 32), (1, 48), (1, 64), (2, 64), (2, 96), (2, 128), (3, 160),
                                       (4, 192), (5, 256), (7, 320), (9, 416), (11, 544))

CHINCHILLA_TOKENS_PER_PARAMETER = 20.0  # Hoffmann et al. 2022
NANOCHAT_TOKENS_PER_PARAMETER = 12.0  # nanochat's isoFLOP sweep (its speedrun trains at this ratio)


class PlanRefused(ValueError):
    """The plan breaks a rule of the study (data repeated too often, a valley without enough widths)."""


# -- models, parameters and FLOPs ---------------------------------------------------------------------------------
def shape_config(layers: int, d_model: int, vocab_size: int, context: int) -> ModelConfig:
    """A rung of the ladder as a qkv decoder: pre-LN, RoPE, no dropout, d_ff = 4·d_model, heads of 32 dimensions
    (16 when d_model is not a multiple of 32), tied input and output embeddings."""
    heads = d_model // 32 if d_model % 32 == 0 else d_model // 16
    return ModelConfig(vocab_size=vocab_size, d_model=d_model, n_heads=heads, d_ff=4 * d_model,
                       n_encoder_layers=0, n_decoder_layers=layers, max_seq_len=context, dropout=0.0,
                       norm_position="pre", positional="rope", activation="gelu")


def _model_type(config: ModelConfig) -> type[nn.Module]:
    if config.n_encoder_layers and config.n_decoder_layers:
        return Transformer
    return Encoder if config.n_encoder_layers else DecoderLM


def _on_meta(config: ModelConfig) -> nn.Module:
    """The model built on PyTorch's meta device: its shapes without its memory (gpt2-small in milliseconds)."""
    with torch.device("meta"):
        return _model_type(config)(config)


def _embedding_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Token, position and segment embeddings and the output layer's weight (tied or not): Kaplan's "embedding"."""
    found: dict[int, nn.Parameter] = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Embedding, PositionalEncoding)):
            found.update({id(p): p for p in module.parameters()})
        elif name.split(".")[-1] == "lm_head" and isinstance(module, nn.Linear):
            found[id(module.weight)] = module.weight
    return list(found.values())


def parameter_counts(config: ModelConfig) -> tuple[int, int]:
    """(N without embeddings, N with them) of the model ``config`` builds. Without: every parameter except the
    token, position and segment embeddings and the output layer's weight (Kaplan et al. 2020's N); with: all."""
    model = _on_meta(config)
    total = sum(p.numel() for p in model.parameters())
    return total - sum(p.numel() for p in _embedding_parameters(model)), total


def matmul_parameters(config: ModelConfig) -> int:
    """The weights every token is multiplied by: every ``nn.Linear`` weight, the output layer's included (tied to
    the embedding or not, it is a d_model x vocab matmul per token); no biases, norms or embedding lookups."""
    return sum(m.weight.numel() for m in _on_meta(config).modules() if isinstance(m, nn.Linear))


def flops_per_token(config: ModelConfig, context: int | None = None) -> float:
    """Training FLOPs per token (forward and backward), nanochat's count:

        C/D = 6·M + 12·L_attn·d·T

    M: :func:`matmul_parameters` (every linear layer's weight, the output layer's d·V included: 2 FLOPs per weight
    forward, 4 backward); 12·d·T per attention layer: QK^T and the weighted sum of V, each 2·d·T forward and twice
    that backward, over a full window of T = ``context`` (default ``max_seq_len``) keys, as nanochat counts
    (causal masking is not subtracted). L_attn counts every attention: a decoder's self-attention layers; an
    encoder-decoder's encoder layers plus twice its decoder layers (self and cross). Biases, norms, softmax and
    the embedding lookup are left out (under 1% here)."""
    t = config.max_seq_len if context is None else context
    attention_layers = config.n_encoder_layers + config.n_decoder_layers * (
        2 if config.n_encoder_layers and config.n_decoder_layers else 1)
    return 6.0 * matmul_parameters(config) + 12.0 * attention_layers * config.d_model * t


# -- the data -----------------------------------------------------------------------------------------------------
def _tatoeba_path(relative: str) -> Path:
    """A Tatoeba zip of the repository's data/: relative to the working directory, else to the source tree."""
    for candidate in (Path(relative), Path(__file__).resolve().parents[3] / relative):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{relative} was not found (the Tatoeba zips ship in the repository's data/, not in "
                            "the wheel); run qkv study scaling from the repository root")


def _held_out(sentence: str) -> bool:
    """An English sentence (with all its translations) belongs to the held-out text: 1 in 20, by hash."""
    return hashlib.sha256(sentence.encode("utf-8")).digest()[0] % 20 == 0


def _build_text(shakespeare: str, zips: Sequence[Path]) -> tuple[str, str, dict[str, int]]:
    """(training text, held-out text, character counts by source)."""
    translations: dict[str, list[str]] = {}
    counts = {"tiny Shakespeare": len(shakespeare), "English (distinct sentences)": 0, "French and German": 0}
    for path in zips:
        for english, other in read_parallel(path).pairs:
            translations.setdefault(english, []).append(other)
            counts["French and German"] += len(other)
    counts["English (distinct sentences)"] = sum(len(e) for e in translations)
    cut = int(len(shakespeare) * 0.95)
    train, val = [shakespeare[:cut]], [shakespeare[cut:]]
    for english, others in translations.items():  # first appearance order: fra-eng's short-to-long, then deu-eng's
        (val if _held_out(english) else train).append("\n" + english + "\n" + "\n".join(others) + "\n")
    return "".join(train), "".join(val), counts


def _encode(text: str, alphabet: str) -> np.ndarray:
    """Characters → ids as :meth:`Tokenizer.char` numbers them (sorted characters), with numpy: 20M in a second."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    table = np.frombuffer(alphabet.encode("utf-32-le"), dtype=np.uint32)
    return np.searchsorted(table, codes).astype(np.uint8 if len(alphabet) <= 256 else np.uint16)


def scaling_corpus(directory: str | Path | None = None) -> tuple[Tokenizer, TokenSplits, dict[str, Any]]:
    """All of the bundled text as characters → (tokenizer, train/held-out ids, facts about it).

    The token files are cached under ``<directory or ~/.cache/qkv>/tokens/`` keyed by the files' sha256, so the
    zips are read once (4 s) and later runs map the ids from disk."""
    shakespeare = (importlib.resources.files("qkv") / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    zips = [_tatoeba_path(z) for z in TATOEBA_ZIPS]
    digest = hashlib.sha256(f"{CORPUS_FORMAT}".encode() + shakespeare.encode())
    for path in zips:
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    folder = (Path(directory) if directory is not None else cache_dir()) / "tokens"
    stem = folder / f"scaling-{digest.hexdigest()[:20]}"
    meta_path = stem.with_suffix(".json")
    if not meta_path.is_file():
        train_text, val_text, counts = _build_text(shakespeare, zips)
        alphabet = "".join(sorted(set(train_text) | set(val_text)))
        folder.mkdir(parents=True, exist_ok=True)
        train, val = _encode(train_text, alphabet), _encode(val_text, alphabet)
        write_atomic(stem.with_suffix(".train.bin"), train.tobytes())
        write_atomic(stem.with_suffix(".val.bin"), val.tobytes())
        meta = {"alphabet": alphabet, "dtype": train.dtype.name, "characters by source": counts,
                "train characters": len(train), "held-out characters": len(val),
                "sources": ["tinyshakespeare (package data)", *(p.name for p in zips)]}
        write_atomic(meta_path, json.dumps(meta, ensure_ascii=False, indent=1).encode())
    meta = json.loads(meta_path.read_text())
    dtype = np.dtype(meta["dtype"])
    splits = TokenSplits(np.memmap(stem.with_suffix(".train.bin"), dtype=dtype, mode="r"),
                         np.memmap(stem.with_suffix(".val.bin"), dtype=dtype, mode="r"))
    return Tokenizer.char(meta["alphabet"]), splits, meta


# -- settings and the plan ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScalingSettings:
    context: int = 128
    batch_size: int = 16
    n_widths: int = 6
    n_budgets: int = 4
    budget_ratio: float = 2.15  # each budget this many times the one before
    budget_hours: float = 2.5
    budgets: tuple[float, ...] | None = None  # fixed budgets in FLOPs (the quick mode): no sizing from throughput
    max_epochs: float = 4.0  # the most times any run may read the training text
    valley_rule: bool = True  # refuse a plan whose predicted best size has < 2 widths on either side
    cooldown: float = 0.2  # the share of each budget's tokens spent cooling down
    warmup: int = 50  # steps at most; never more than a fifth of the smallest budget's constant phase
    lr: float = 4e-3  # at d_model 128; candidates lr·sqrt(128/d_model)·factor
    lr_factors: tuple[float, ...] = (0.5, 1.0, 2.0)
    weight_decay: float = 0.1
    eval_batches: int = 16
    throughput_steps: int = 2
    bootstrap: int = 200
    law_starts: tuple[tuple[float, ...], ...] = laws.START_GRID
    ladder: tuple[tuple[int, int], ...] = LADDER
    # the prior counts tokens as Chinchilla's word-pieces: about 4 characters each (a character carries about a
    # quarter of what a word-piece does). Read as 1 character = 1 token, the 2026-12-07 preview's valleys sat 2-3x
    # below the sizes the prior predicted; read as 4, they sit within a rung of it
    prior_characters_per_token: float = 4.0

    def lr_candidates(self, d_model: int) -> list[float]:
        return [float(f"{self.lr * math.sqrt(128 / d_model) * f:.3g}") for f in self.lr_factors]


FULL = ScalingSettings()
QUICK = ScalingSettings(context=32, batch_size=8, n_widths=5, budgets=tuple(3e8 * 2.15 ** k for k in range(4)),
                        valley_rule=False, warmup=5, lr=8e-3, lr_factors=(1.0, 2.0), eval_batches=4,
                        throughput_steps=1, bootstrap=10,
                        law_starts=tuple((a, b, e, al, be) for a in (0.0, 10.0) for b in (0.0, 10.0)
                                         for e in (-1.0, 0.0, 1.0) for al in (0.5, 1.0) for be in (0.5, 1.0)))


def _steps(flops: float, per_token: float, tokens_per_step: int) -> int:
    return max(2, round(flops / (per_token * tokens_per_step)))


def plan_study(settings: ScalingSettings, throughput: Callable[[int], float], train_tokens: int, vocab_size: int,
               *, quick: bool = False) -> dict[str, Any]:
    """The study's plan: which rungs, which budgets, how many steps each run takes → a JSON-ready dict.

    ``throughput(rung)`` is the training speed of that rung of the ladder in tokens/s (measured once per rung the
    search looks at). Budgets: given (``settings.budgets``) or sized so that every width's runs — the sweep, the
    constant-rate run to 80% of the largest budget, every cool-down — take ``budget_hours`` in all.
    Raises :class:`PlanRefused` in one line when the largest budget reads the training text more than
    ``max_epochs`` times, or when no run of ``n_widths`` rungs puts 2 rungs or more on each side of every budget's
    best size predicted by the prior (Chinchilla's fitted L(N, D), ``prior_characters_per_token`` characters to
    one of its tokens).
    """
    s = settings
    tokens_per_step = s.batch_size * s.context
    configs = [shape_config(layers, d, vocab_size, s.context) for layers, d in s.ladder]
    per_token = [flops_per_token(c) for c in configs]
    n_params = [parameter_counts(c)[0] for c in configs]
    ratios = [s.budget_ratio ** -(s.n_budgets - 1 - k) for k in range(s.n_budgets)]  # budget / largest
    # tokens each width reads, as a multiple of the largest budget's tokens: constant phase, cool-downs, sweep
    work = (1 - s.cooldown) + s.cooldown * sum(ratios) + (len(s.lr_factors) - 1) * ratios[0]

    def largest_budget(first: int) -> float:
        seconds = 0.95 * s.budget_hours * 3600  # 5% for evaluation, checkpoints and fits
        return seconds / sum(work / (per_token[r] * throughput(r)) for r in range(first, first + s.n_widths))

    log_n, log_f = np.log(n_params), np.log(per_token)
    fine = np.linspace(log_n[0], log_n[-1], 800)  # sizes between the rungs, FLOPs per token interpolated

    def best_sizes(budgets: list[float]) -> np.ndarray:
        """For each budget, the size (in ln N) with the lowest loss the prior predicts at that compute."""
        tokens = [c / np.exp(np.interp(fine, log_n, log_f)) / s.prior_characters_per_token for c in budgets]
        return np.array([fine[np.argmin(laws.CHINCHILLA.loss(np.exp(fine), d))] for d in tokens])

    def valid(budgets: list[float], first: int) -> bool:
        window = log_n[first:first + s.n_widths]
        return all((window < b).sum() >= 2 and (window > b).sum() >= 2 for b in best_sizes(budgets))

    def budgets_for(first: int) -> list[float]:
        top = s.budgets[-1] if s.budgets else largest_budget(first)
        return list(s.budgets) if s.budgets else [top * ratio for ratio in ratios]

    first = 0
    if s.valley_rule:
        # budgets depend on the window's speed, the window on the budgets: step the window towards the one
        # whose middle is nearest the predicted best sizes until it stays put (or comes back: then the best seen)
        first, seen = (len(s.ladder) - s.n_widths) // 2, {}
        while first not in seen:
            best = best_sizes(budgets_for(first))
            middles = [(log_n[f] + log_n[f + s.n_widths - 1]) / 2 for f in range(len(s.ladder) - s.n_widths + 1)]
            ideal = int(np.argmin([abs(m - best.mean()) for m in middles]))
            seen[first] = (not valid(budgets_for(first), first), abs(middles[first] - best.mean()))
            first = first + (ideal > first) - (ideal < first)
        first = min(seen, key=seen.get)
    budgets = budgets_for(first)
    if s.valley_rule and not valid(budgets, first):
        best = np.exp(best_sizes(budgets))
        direction = "raise --budget-hours" if best.min() < n_params[2] else "lower --budget-hours"
        raise PlanRefused(f"no {s.n_widths} widths of the ladder ({n_params[0]:,} to {n_params[-1]:,} parameters) put "
                          f"2 on each side of every budget's predicted best size ({best.min():,.0f} to "
                          f"{best.max():,.0f} parameters for {budgets[0]:.2g} to {budgets[-1]:.2g} FLOPs); "
                          f"{direction}")
    rungs = list(range(first, first + s.n_widths))
    widths, points, seconds = [], [], 0.0
    for i, r in enumerate(rungs):
        config = configs[r]
        steps = [_steps(c, per_token[r], tokens_per_step) for c in budgets]
        starts = [max(1, round((1 - s.cooldown) * n)) for n in steps]
        warmup = max(1, min(s.warmup, starts[0] // 5))
        widths.append({"width": i, "rung": r, "layers": config.n_decoder_layers, "d_model": config.d_model,
                       "heads": config.n_heads, "N (non-embedding)": n_params[r],
                       "N (with embeddings)": parameter_counts(config)[1], "FLOPs per token": per_token[r],
                       "tokens/s (measured)": throughput(r), "warmup steps": warmup,
                       "lr candidates": s.lr_candidates(config.d_model)})
        tokens = (starts[-1] + sum(n - a for n, a in zip(steps, starts, strict=True))
                  + (len(s.lr_factors) - 1) * steps[0]) * tokens_per_step
        seconds += tokens / throughput(r)
        for k, (n, a) in enumerate(zip(steps, starts, strict=True)):
            points.append({"width": i, "budget": k, "steps": n, "cool-down from": a, "tokens": n * tokens_per_step,
                           "FLOPs": n * tokens_per_step * per_token[r], "epochs": n * tokens_per_step / train_tokens})
    worst = max(points, key=lambda p: p["epochs"])
    if worst["epochs"] > s.max_epochs:
        hint = (f"give --budget-hours at most {s.budget_hours * s.max_epochs / worst['epochs']:.2g}" if not s.budgets
                else "use smaller budgets")
        raise PlanRefused(f"the {widths[worst['width']]['N (non-embedding)']:,}-parameter model would read the "
                          f"training text {worst['epochs']:.1f} times at {budgets[worst['budget']]:.3g} FLOPs, more "
                          f"than {s.max_epochs:g} (repeated data stops paying off: Muennighoff et al. 2023); {hint}")
    return {"format": 1, "quick": quick, "settings": _settings_dict(s), "train tokens": train_tokens,
            "vocab size": vocab_size, "budgets": budgets, "widths": widths, "points": points,
            "estimated hours": seconds / 3600 / 0.95,
            "predicted best size per budget (the prior)": [round(float(np.exp(b))) for b in best_sizes(budgets)]}


def _tuples(value: Any) -> Any:
    """JSON's lists back into the settings' tuples."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _settings_dict(s: ScalingSettings) -> dict[str, Any]:
    values = dataclasses.asdict(s)
    values.pop("law_starts")
    return values


def plan_text(plan: dict[str, Any]) -> str:
    """The plan as a reader checks it before hours of training: the widths, the budgets, steps and epochs."""
    lines = [f"qkv study scaling: the plan ({len(plan['widths'])} widths x {len(plan['budgets'])} budgets, about "
             f"{plan['estimated hours']:.2g} hours; budgets {', '.join(f'{c:.3g}' for c in plan['budgets'])} FLOPs)"]
    rows = []
    for w in plan["widths"]:
        row = {"width": w["width"], "layers": w["layers"], "d_model": w["d_model"],
               "N (non-embedding)": w["N (non-embedding)"], "tokens/s": round(w["tokens/s (measured)"])}
        for p in plan["points"]:
            if p["width"] == w["width"]:
                row[f"steps at C{p['budget']}"] = p["steps"]
        rows.append(row)
    lines.append(markdown_table(rows))
    worst = max(p["epochs"] for p in plan["points"])
    lines.append(f"the most any run reads the training text: {worst:.2f} times")
    return "\n".join(lines)


# -- training -----------------------------------------------------------------------------------------------------
def measure_throughput(config: ModelConfig, batch_size: int, *, steps: int = 2, seed: int = 0) -> float:
    """Training tokens per second of ``config`` at this batch: one warm-up step, then the median of ``steps``
    timed steps (forward, backward, clipping, AdamW) on random ids."""
    torch.manual_seed(seed)
    model = DecoderLM(config)
    optimizer = _optimizer(model, 1e-3, 0.1)
    ids = torch.randint(0, config.vocab_size, (batch_size, config.max_seq_len + 1),
                        generator=torch.Generator().manual_seed(seed))
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        logits = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return batch_size * config.max_seq_len / float(np.median(times[1:]))


def _optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    device = next(model.parameters()).device
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95), **adamw_kernel(device))


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, objective: NextToken, data: WindowBatches,
           start: int, end: int, lr_at: Callable[[int], float], tick: Callable[[], None]) -> bool:
    """Steps [start, end) on batches data.batch(step); → False if a loss or gradient went non-finite (stopped)."""
    model.train()
    for step in range(start, end):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss, _ = objective.loss(model, data.batch(step), None)
        loss.backward()
        norm = float(nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        if not (math.isfinite(loss.item()) and math.isfinite(norm)):
            optimizer.zero_grad(set_to_none=True)
            return False
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tick()
    return True


@torch.no_grad()
def _evaluate(model: nn.Module, objective: NextToken, batches: list[torch.Tensor]) -> float:
    model.eval()
    losses = [float(objective.loss(model, b, None, smoothed=False)[0]) for b in batches]
    return sum(losses) / len(losses)


def _save(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, tmp)
    os.replace(tmp, path)  # a kill during the save leaves the previous checkpoint whole


def _load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


@dataclass
class _Run:
    """What every unit of work needs: the plan, the data, where state lives."""

    plan: dict[str, Any]
    settings: ScalingSettings
    out: Path
    objective: NextToken
    data: WindowBatches
    val: list[torch.Tensor]
    seed: int
    points: dict[str, dict[str, Any]] = field(default_factory=dict)

    def config(self, width: int) -> ModelConfig:
        w = self.plan["widths"][width]
        return shape_config(w["layers"], w["d_model"], self.plan["vocab size"], self.settings.context)

    def point(self, width: int, budget: int) -> dict[str, Any]:
        return next(p for p in self.plan["points"] if p["width"] == width and p["budget"] == budget)

    def fresh(self, width: int, lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(self.seed)  # every candidate of a width starts from the same weights
        model = DecoderLM(self.config(width))
        return model, _optimizer(model, lr, self.settings.weight_decay)

    def record(self, name: str, row: dict[str, Any]) -> None:
        self.points[name] = row
        write_atomic(self.out / "points.json", json.dumps(self.points, indent=1).encode())

    def branch(self, model: nn.Module, optimizer: torch.optim.Optimizer, width: int, budget: int, lr: float,
               tick: Callable[[], None]) -> dict[str, Any]:
        """Cool the model down from its constant-rate step to the budget's last step, evaluate → the run's row."""
        p, w = self.point(width, budget), self.plan["widths"][width]
        length = p["steps"] - p["cool-down from"]
        finite = _train(model, optimizer, self.objective, self.data, p["cool-down from"], p["steps"],
                        lambda step: lr * (1 - math.sqrt((step - p["cool-down from"]) / length)), tick)
        return {"width": width, "layers": w["layers"], "d_model": w["d_model"],
                "N (non-embedding)": w["N (non-embedding)"], "N (with embeddings)": w["N (with embeddings)"],
                "budget": budget, "lr": lr, "steps": p["steps"], "tokens": p["tokens"], "FLOPs": p["FLOPs"],
                "epochs": p["epochs"], "val loss": _evaluate(model, self.objective, self.val) if finite else math.nan}


def _units(plan: dict[str, Any], settings: ScalingSettings) -> list[tuple[str, int, int]]:
    """The study's units of work in order: ("sweep", width, candidate), then ("branch", width, budget) budget by
    budget, so a stopped study has whole valleys for its smaller budgets."""
    widths = range(len(plan["widths"]))
    return ([("sweep", w, j) for w in widths for j in range(len(settings.lr_factors))]
            + [("branch", w, k) for k in range(len(plan["budgets"])) for w in widths])


def _name(kind: str, width: int, index: int) -> str:
    return f"w{width}-lr{index}" if kind == "sweep" else f"w{width}-b{index}"


def _do_unit(run: _Run, kind: str, width: int, index: int, tick: Callable[[], None]) -> None:
    s, w = run.settings, run.plan["widths"][width]
    checkpoints = run.out / "checkpoints"
    main = checkpoints / f"w{width}.pt"
    warmup = w["warmup steps"]
    started = time.perf_counter()
    if kind == "sweep":
        lr = w["lr candidates"][index]
        model, optimizer = run.fresh(width, lr)
        p = run.point(width, 0)
        finite = _train(model, optimizer, run.objective, run.data, 0, p["cool-down from"],
                        lambda step: lr * min(1.0, (step + 1) / warmup), tick)
        _save(checkpoints / f"w{width}-lr{index}.pt", model, optimizer, p["cool-down from"])
        row = run.branch(model, optimizer, width, 0, lr, tick) if finite else {"val loss": math.nan}
        run.record(_name(kind, width, index), {**row, "lr candidate": index,
                                               "seconds": time.perf_counter() - started})
        return
    if index == 0:  # the sweep's best candidate is this width's run: its checkpoint and its smallest budget
        sweep = [run.points[_name("sweep", width, j)] for j in range(len(s.lr_factors))]
        losses = [r["val loss"] if math.isfinite(r["val loss"]) else math.inf for r in sweep]
        best = int(np.argmin(losses))
        os.replace(checkpoints / f"w{width}-lr{best}.pt", main)
        for j in range(len(s.lr_factors)):
            (checkpoints / f"w{width}-lr{j}.pt").unlink(missing_ok=True)
        run.record(_name(kind, width, 0), {k: v for k, v in sweep[best].items() if k != "lr candidate"})
        return
    lr = run.points[_name("branch", width, 0)]["lr"]
    model, optimizer = run.fresh(width, lr)
    step = _load(main, model, optimizer)
    target = run.point(width, index)["cool-down from"]
    finite = _train(model, optimizer, run.objective, run.data, step, target, lambda _: lr, tick)
    _save(main, model, optimizer, target)
    row = run.branch(model, optimizer, width, index, lr, tick) if finite else {"val loss": math.nan}
    run.record(_name(kind, width, index), {**row, "seconds": time.perf_counter() - started})


def _unit_steps(run: _Run, kind: str, width: int, index: int) -> int:
    if kind == "sweep":
        return run.point(width, 0)["steps"]
    if index == 0:
        return 0
    return run.point(width, index)["steps"] - run.point(width, index - 1)["cool-down from"]


# -- the study ----------------------------------------------------------------------------------------------------
def default_out() -> Path:
    """Where the study keeps its state and results when no --out is given: ``~/.cache/qkv/study`` (``$QKV_CACHE_DIR``
    or ``$XDG_CACHE_HOME/qkv`` when set): outside the work tree, which is laid anew each session."""
    return cache_dir() / "study"


def scaling_study(*, quick: bool = False, out_dir: str | Path | None = None, seed: int = 0, progress: bool = True,
                  budget_hours: float | None = None, settings: ScalingSettings | None = None,
                  max_units: int | None = None) -> StudyResult:
    """Plan (or read the saved plan), run every unit not yet done, fit, write ``<out_dir>/scaling/`` (quick:
    ``scaling-quick/``); → the result. ``max_units``: stop after that many units of work this call (a piece of the
    study; calling again continues). A study stopped before its last unit returns the runs so far, unfitted."""
    require("scipy.optimize", "the scaling study's fits")  # before hours of training, not after
    s = settings or (QUICK if quick else FULL)
    if budget_hours is not None:
        if not (isinstance(budget_hours, (int, float)) and 0 < budget_hours < math.inf):
            raise ValueError(f"--budget-hours {budget_hours} must be a positive number of hours, e.g. 2.5")
        if s.budgets:
            raise ValueError("--budget-hours sizes the full study; a --quick run has fixed budgets: leave one out")
        s = dataclasses.replace(s, budget_hours=float(budget_hours))
    started, cpu_started = time.perf_counter(), time.process_time()
    out = Path(out_dir if out_dir is not None else default_out()) / ("scaling-quick" if quick else "scaling")
    tokenizer, splits, corpus = scaling_corpus()
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if progress else (lambda text: None)

    plan_path = out / "plan.json"
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text())
        saved = plan["settings"]
        if plan["quick"] != quick or (budget_hours is not None and saved["budget_hours"] != s.budget_hours) \
                or plan.get("seed", 0) != seed:
            raise ValueError(f"{out} holds a study planned with --budget-hours {saved['budget_hours']:g}, seed "
                             f"{plan.get('seed', 0)}{' (quick)' if plan['quick'] else ''}; continue it with those, "
                             "or give another --out")
        s = dataclasses.replace(s, **{k: _tuples(v) for k, v in saved.items()})  # the plan's settings, exactly
        say(f"qkv study scaling: continuing the study in {out}")
    else:
        measured: dict[int, float] = {}

        def throughput(rung: int) -> float:
            if rung not in measured:
                layers, d = s.ladder[rung]
                measured[rung] = measure_throughput(shape_config(layers, d, tokenizer.vocab_size, s.context),
                                                    s.batch_size, steps=s.throughput_steps, seed=seed)
            return measured[rung]

        plan = plan_study(s, throughput, len(splits.train), tokenizer.vocab_size, quick=quick)
        plan["seed"] = seed
        plan["threads"] = torch.get_num_threads()
        plan["corpus"] = corpus
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(plan_path, json.dumps(plan, indent=1, ensure_ascii=False).encode())
    say(plan_text(plan))
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)

    run = _Run(plan, s, out, NextToken(tokenizer, TrainConfig()),
               WindowBatches(splits.train, s.context + 1, s.batch_size, seed=seed),
               WindowBatches(splits.val, s.context + 1, s.batch_size, seed=seed, name="held-out")
               .fixed(s.eval_batches), seed)
    if (out / "points.json").is_file():
        run.points = json.loads((out / "points.json").read_text())
    units = _units(plan, s)
    todo = [u for u in units if _name(*u) not in run.points]
    done_now = 0
    with Progress(sum(_unit_steps(run, *u) for u in units), "qkv study scaling", enabled=progress) as bar:
        bar.update(sum(_unit_steps(run, *u) for u in units if u not in todo))
        for unit in todo:
            if max_units is not None and done_now >= max_units:
                break
            name = _name(*unit)
            _do_unit(run, *unit, tick=lambda name=name: bar.update(1, name))
            done_now += 1
    complete = all(_name(*u) in run.points for u in units)
    result, fits = _report(run, units, complete, quick)
    return finish(result, out, lambda folder: _figures(result, fits, folder) if fits else [],
                  (started, cpu_started))


# -- results ------------------------------------------------------------------------------------------------------
# qkv's presets and the articles' "mini Transformer" (2-6 layers, d_model 512, 8 heads) placed on the fitted law.
# "the demo" is qkv.demo.DEMO_MODEL (tests/test_study_scaling.py keeps the two equal; qkv.study may not import it)
PRESETS_PLACED: dict[str, ModelConfig] = {
    "tiny-decoder": ModelConfig.preset("tiny-decoder"),
    "the demo's model": ModelConfig(vocab_size=65, d_model=128, n_heads=4, d_ff=512, n_encoder_layers=0,
                                    n_decoder_layers=4, max_seq_len=64, dropout=0.0, activation="gelu",
                                    norm_position="pre", positional="rope", tie_embeddings=True),
    "mini Transformer, 2 layers": ModelConfig(vocab_size=65, d_model=512, n_heads=8, d_ff=2048,
                                              n_decoder_layers=2, max_seq_len=256),
    "mini Transformer, 6 layers": ModelConfig(vocab_size=65, d_model=512, n_heads=8, d_ff=2048,
                                              n_decoder_layers=6, max_seq_len=256),
    "vaswani-base": ModelConfig.preset("vaswani-base"),
    "gpt2-small": ModelConfig.preset("gpt2-small"),
}


def _report(run: _Run, units: list[tuple[str, int, int]], complete: bool, quick: bool
            ) -> tuple[StudyResult, dict[str, Any] | None]:
    """The tables (and, once every unit is done, the fits: → the fitted laws for the figures, else None)."""
    plan, s = run.plan, run.settings
    branches = [run.points[_name(*u)] for u in units if u[0] == "branch" and _name(*u) in run.points]
    sweep_rows = []
    for w in plan["widths"]:
        row = {"width": w["width"], "layers": w["layers"], "d_model": w["d_model"], "heads": w["heads"],
               "N (non-embedding)": w["N (non-embedding)"], "N (with embeddings)": w["N (with embeddings)"],
               "FLOPs per token": w["FLOPs per token"], "tokens/s": round(w["tokens/s (measured)"]),
               "warm-up steps": w["warmup steps"]}
        row["lr candidates"] = ", ".join(f"{lr:g}" for lr in w["lr candidates"])
        for j, factor in enumerate(s.lr_factors):
            found = run.points.get(_name("sweep", w["width"], j))
            row[f"loss at lr x{factor:g}"] = found["val loss"] if found else None
        chosen = run.points.get(_name("branch", w["width"], 0))
        row["lr chosen"] = chosen["lr"] if chosen else None
        sweep_rows.append(row)
    runs_rows = [{k: r[k] for k in ("width", "N (non-embedding)", "budget", "FLOPs", "tokens", "steps", "epochs",
                                    "lr", "val loss")} for r in branches]
    corpus = plan.get("corpus", {})
    settings = {
        "data": f"characters of all the bundled text ({corpus.get('train characters', 0):,} training, "
                f"{corpus.get('held-out characters', 0):,} held out; vocabulary {plan['vocab size']})",
        "models": f"decoders, pre-LN, RoPE, d_ff 4·d_model, context {s.context}, batch {s.batch_size}",
        "schedule": f"AdamW (0.9, 0.95), weight decay {s.weight_decay}, clip 1.0; warm-up then a constant lr, "
                    f"(1-sqrt) cool-down over the last {s.cooldown:.0%} of each budget",
        "budgets": ", ".join(f"{c:.3g}" for c in plan["budgets"]) + " FLOPs",
        "budget hours": s.budget_hours if not quick else "n/a (quick: fixed budgets)",
        "seed": run.seed, "threads": plan.get("threads"),
    }
    captions = {
        "widths and the learning-rate sweep": "Each width's held-out loss at the smallest budget for each "
                                               "learning-rate candidate (lr x factor: the candidates listed, in "
                                               "order); the best continues as the width's run.",
        "runs": "Every (width, budget) run: its FLOPs (nanochat's count), tokens, how many times it read the "
                "training text, and the held-out loss in nats per character after its cool-down.",
    }
    tables: dict[str, list[dict[str, Any]]] = {"widths and the learning-rate sweep": sweep_rows, "runs": runs_rows}
    result = StudyResult(name="scaling", quick=quick, title="Scaling laws on this machine: loss against parameters, "
                         "data and compute", settings=settings, tables=tables, captions=captions)
    everything = list(range(len(plan["budgets"])))
    if not complete:
        note = f"{len(run.points)} of {len(units)} units of work done; run the same command again to continue."
        whole = [k for k in everything if all(_name("branch", w, k) in run.points for w in range(len(plan["widths"])))]
        if len(whole) < 2:  # fewer than two whole valleys: nothing to fit a power law through yet
            result.notes = [note]
            return result, None
        fits = _fit(result, run, [r for r in branches if r["budget"] in whole], whole)
        flops = ", ".join(f"{plan['budgets'][k]:.3g}" for k in whole)
        result.notes.insert(0, f"{note} The fits use the {len(whole)} budgets whose every width is done "
                               f"({flops} FLOPs) of the plan's {len(everything)}: a preview of the whole study's.")
        return result, fits
    return result, _fit(result, run, branches, everything)


def _interval(bounds: tuple[float, float]) -> str | None:
    low, high = bounds
    return f"{low:.3g} to {high:.3g}" if math.isfinite(low) and math.isfinite(high) else None


def _fit(result: StudyResult, run: _Run, branches: list[dict[str, Any]], budgets: list[int]) -> dict[str, Any]:
    """The valleys of ``budgets`` (indices into the plan's), the power laws through them, L(N, D) over
    ``branches``, the presets placed; → the fitted laws for the figures."""
    plan, s = run.plan, run.settings
    good = [r for r in branches if math.isfinite(r["val loss"])]
    n = np.array([r["N (non-embedding)"] for r in good], dtype=np.float64)
    d = np.array([r["tokens"] for r in good], dtype=np.float64)
    loss = np.array([r["val loss"] for r in good], dtype=np.float64)
    per_budget, valley_budgets = [], []
    for k in budgets:
        rows = [r for r in good if r["budget"] == k]
        if len(rows) >= 3:
            valley_budgets.append(k)
            per_budget.append((float(np.mean([r["FLOPs"] for r in rows])), [r["N (non-embedding)"] for r in rows],
                               [r["tokens"] for r in rows], [r["val loss"] for r in rows]))
    valleys, n_law, d_law = laws.valley_exponents(per_budget)
    valley_rows = [{"budget": valley_budgets[i], "FLOPs": v.flops, "N_opt": v.n_opt, "D_opt": v.d_opt,
                    "tokens per parameter": v.d_opt / v.n_opt if math.isfinite(v.n_opt) else None,
                    "loss at the minimum": v.loss, "minimum inside the widths": v.inside}
                   for i, v in enumerate(valleys)]
    found = laws.valleys_fitted(valleys)
    spread = (laws.bootstrap_valley_exponents(per_budget, samples=s.bootstrap, seed=run.seed) if n_law else
              {"a": (math.nan, math.nan), "b": (math.nan, math.nan)})
    law = laws.fit_law(n, d, loss, starts=s.law_starts)
    intervals = laws.bootstrap_law(n, d, loss, law, samples=s.bootstrap, seed=run.seed)
    law_rows = [
        {"quantity": f"N_opt ∝ C^a (isoFLOP valleys: {len(found)} with the minimum inside the widths)"
         if len(found) < len(valleys) else "N_opt ∝ C^a (isoFLOP valleys)",
         "value": n_law.exponent if n_law else None,
         "90% interval": _interval(spread["a"]), "Chinchilla": 0.50, "Kaplan et al.": 0.73},
        {"quantity": "D_opt ∝ C^b (isoFLOP valleys)", "value": d_law.exponent if d_law else None,
         "90% interval": _interval(spread["b"]), "Chinchilla": 0.50, "Kaplan et al.": 0.27},
    ]
    for key, name, chinchilla in (("E", "E (irreducible loss, nats/char)", 1.69), ("A", "A", 406.4),
                                  ("B", "B", 410.7), ("alpha", "α", 0.34), ("beta", "β", 0.28),
                                  ("a = beta/(alpha+beta)", "a = β/(α+β) (parametric)", 0.45)):
        value = (law.beta / (law.alpha + law.beta)) if key.startswith("a =") else getattr(law, key)
        law_rows.append({"quantity": name, "value": value, "90% interval": _interval(intervals[key]),
                         "Chinchilla": chinchilla, "Kaplan et al.": None})
    result.tables["isoFLOP valleys"] = valley_rows
    result.tables["fitted laws"] = law_rows
    result.captions["isoFLOP valleys"] = ("A parabola in ln N through each budget's held-out losses: its minimum "
                                          "N_opt, the tokens D_opt a model that size reads at the budget, and "
                                          f"D_opt/N_opt beside Chinchilla's {CHINCHILLA_TOKENS_PER_PARAMETER:g} "
                                          f"and nanochat's {NANOCHAT_TOKENS_PER_PARAMETER:g} tokens per parameter.")
    result.captions["fitted laws"] = (f"The parametric L(N, D) = E + A/N^α + B/D^β over {len(good)} runs (Huber "
                                      "δ = 1e-3 on log loss, L-BFGS from a grid of starts), 90% intervals from "
                                      f"{s.bootstrap} bootstrap refits over runs (for the valleys' exponents: each "
                                      "budget's runs drawn again, the parabolas and the power laws refitted); "
                                      "Chinchilla's values are for BPE tokens of MassiveText, not comparable in E, "
                                      "A, B.")
    placed = []
    for name, config in PRESETS_PLACED.items():
        non_embedding, total = parameter_counts(config)
        row: dict[str, Any] = {"model": name, "layers": config.n_encoder_layers + config.n_decoder_layers,
                               "d_model": config.d_model, "N (non-embedding)": non_embedding,
                               "N (with its embeddings)": total,
                               "x the largest N measured": non_embedding / float(n.max())}
        if n_law is not None and d_law is not None:
            c_opt = float(n_law.inverse(non_embedding))
            row.update({"compute-optimal FLOPs": c_opt, "compute-optimal tokens (characters)": float(d_law(c_opt)),
                        "tokens per parameter": float(d_law(c_opt)) / non_embedding})
        placed.append(row)
    result.tables["the articles' table, on this corpus's law"] = placed
    result.captions["the articles' table, on this corpus's law"] = (
        "Each model's N placed on the isoFLOP power laws: the compute budget (nanochat's FLOP count) at which it "
        "would be this corpus's compute-optimal size, and the characters of this kind of text it would then read. "
        "An extrapolation far past the measured sizes (see the x column), and a statement about this corpus of "
        "characters, never a prediction of these models' losses on their own training data.")
    epochs = max(r["epochs"] for r in branches)
    tokens_per_param = [v.d_opt / v.n_opt for v in found]
    span = float(n.max() / n.min())
    result.notes = [
        f"The largest budget's longest run (the smallest width) read the training text {epochs:.2f} times; "
        f"{plan['train tokens']:,} training characters.",
        (f"At the optimum this corpus asks for {min(tokens_per_param):.0f} to {max(tokens_per_param):.0f} characters "
         f"per parameter across the budgets (Chinchilla: {CHINCHILLA_TOKENS_PER_PARAMETER:g} BPE tokens, nanochat: "
         f"{NANOCHAT_TOKENS_PER_PARAMETER:g}); a character carries less than a BPE token (about a quarter of a "
         "word-piece), so more of them per parameter is expected." if tokens_per_param else
         "No budget's losses formed a valley, so no optimum was measured."),
        f"What this range can tell: the exponents over a {span:.0f}x span of sizes and a "
        f"{plan['budgets'][budgets[-1]] / plan['budgets'][budgets[0]]:.0f}x span of compute, one seed each. What it "
        "cannot: the "
        "exponents at 1000x the size (they drift with scale: Kaplan's 0.73 became Chinchilla's 0.50 once warm-up, "
        "cool-down and the output layer's FLOPs were fixed, Porian et al. 2024), the constants of another tokenizer "
        "or corpus, or anything about the presets' own data: the last table extrapolates this corpus's law.",
    ]
    return {"law": law.as_dict(), "N_opt": dataclasses.asdict(n_law) if n_law else None,
            "D_opt": dataclasses.asdict(d_law) if d_law else None}


def _figures(result: StudyResult, fits: dict[str, Any], folder: Path) -> list[Path]:
    runs = result.tables["runs"]
    law = laws.Law(**fits["law"])
    n_law = laws.PowerLaw(**fits["N_opt"]) if fits["N_opt"] else None
    d_law = laws.PowerLaw(**fits["D_opt"]) if fits["D_opt"] else None
    plt = pyplot()
    widths = sorted({r["width"] for r in runs})
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(widths)))
    paths = []

    fig, ax = plt.subplots(figsize=(8, 5))
    for w, colour in zip(widths, colours, strict=True):
        rows = [r for r in runs if r["width"] == w]
        ax.plot([r["FLOPs"] for r in rows], [r["val loss"] for r in rows], "o-", color=colour,
                label=f"N = {rows[0]['N (non-embedding)']:,}")
    if n_law is not None and d_law is not None:
        c = np.geomspace(min(r["FLOPs"] for r in runs) / 2, max(r["FLOPs"] for r in runs) * 4, 50)
        ax.plot(c, law.loss(n_law(c), d_law(c)), "k--", label="fitted frontier: L(N_opt(C), D_opt(C))")
    ax.set_xscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("held-out loss (nats per character)")
    ax.set_title("Loss against compute, one line per width")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    paths.append(save_figure(fig, folder / "loss-vs-compute.png"))

    fig, ax = plt.subplots(figsize=(8, 5))
    budgets = sorted({r["budget"] for r in runs})
    valleys = {r["budget"]: r for r in result.tables["isoFLOP valleys"]}
    for k, colour in zip(budgets, plt.cm.plasma(np.linspace(0, 0.85, len(budgets))), strict=True):
        rows = sorted((r for r in runs if r["budget"] == k and math.isfinite(r["val loss"])),
                      key=lambda r: r["N (non-embedding)"])
        x = np.log([r["N (non-embedding)"] for r in rows])
        y = [r["val loss"] for r in rows]
        ax.plot(np.exp(x), y, "o", color=colour, label=f"C = {rows[0]['FLOPs']:.2g}")
        if len(rows) >= 3:
            grid = np.linspace(x.min(), x.max(), 50)
            ax.plot(np.exp(grid), np.polyval(np.polyfit(x, y, 2), grid), "-", color=colour, alpha=0.7)
        v = valleys.get(k)
        if v and v["N_opt"] and math.isfinite(v["N_opt"]):
            ax.plot([v["N_opt"]], [v["loss at the minimum"]], "*", color=colour, markersize=14, markeredgecolor="k")
    ax.set_xscale("log")
    ax.set_xlabel("parameters N (non-embedding)")
    ax.set_ylabel("held-out loss (nats per character)")
    ax.set_title("isoFLOP valleys: a parabola in ln N per budget, its minimum starred")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    paths.append(save_figure(fig, folder / "isoflop.png"))

    fig, ax = plt.subplots(figsize=(8, 5.5))
    n_values = [r["N (non-embedding)"] for r in runs]
    d_values = [r["tokens"] for r in runs]
    grid_n = np.geomspace(min(n_values) / 3, max(n_values) * 3, 120)
    grid_d = np.geomspace(min(d_values) / 3, max(d_values) * 3, 120)
    mesh_n, mesh_d = np.meshgrid(grid_n, grid_d)
    surface = law.loss(mesh_n, mesh_d)
    levels = np.quantile(surface, np.linspace(0.02, 0.9, 14))
    filled = ax.contourf(mesh_n, mesh_d, surface, levels=levels, cmap="viridis_r")
    fig.colorbar(filled, ax=ax, label="fitted loss (nats per character)")
    ax.scatter(n_values, d_values, c="white", edgecolors="k", s=30, label="runs")
    if n_law is not None and d_law is not None:
        c = np.geomspace(min(r["FLOPs"] for r in runs) / 10, max(r["FLOPs"] for r in runs) * 10, 50)
        ax.plot(n_law(c), d_law(c), "r-", label="compute-optimal N, D (isoFLOP fits)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(grid_n[0], grid_n[-1])
    ax.set_ylim(grid_d[0], grid_d[-1])
    ax.set_xlabel("parameters N (non-embedding)")
    ax.set_ylabel("training tokens D (characters)")
    ax.set_title(f"L(N, D) = {law.E:.2f} + {law.A:.3g}/N^{law.alpha:.2f} + {law.B:.3g}/D^{law.beta:.2f}")
    ax.legend(fontsize=8, loc="lower left")
    paths.append(save_figure(fig, folder / "law-contours.png"))
    return paths
