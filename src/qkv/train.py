"""Training: one loop for every model shape, with the objective as a small pluggable part.

- ``NextToken`` (``DecoderLM``): L = -mean_t log P(x_{t+1} | x_≤t).
- ``MaskedLM`` (``Encoder``): BERT's recipe, loss on the 15% chosen tokens only.
- The encoder-decoder objective registers itself in ``OBJECTIVES["seq2seq"]`` with its own batch source.

A batch source is anything with ``batch(index)`` (training batch number ``index``, a pure function of the index)
and ``fixed(n_batches)`` (the evaluation batches); the objective turns what the source yields into a loss.
The trainer owns what every objective shares: AdamW with weight-decay groups, the learning-rate schedule,
gradient accumulation and clipping, mixed precision, evaluation, metrics, checkpoints, interruption and the
divergence guard.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from .blocks import DecoderBlock, EncoderBlock, RMSNorm
from .checkpoint import (
    claim_run_directory,
    fault_point,
    load_checkpoint,
    load_trainer_state,
    read_run_info,
    run_directory_of,
    save_run_checkpoint,
    write_atomic,
)
from .config import ModelConfig
from .data import BUNDLED, Corpus, TokenSplits, WindowBatches, load_tokens, read_corpus
from .losses import IGNORE_INDEX, cross_entropy
from .models import build_model, model_class_for
from .positions import PositionalEncoding
from .tokenizers import Tokenizer

__all__ = ["TrainConfig", "Objective", "NextToken", "MaskedLM", "OBJECTIVES", "BatchSource", "Trainer",
           "TrainResult", "TrainingDiverged", "TrainingInterrupted", "warmup_cosine", "noam_lr", "param_groups",
           "train", "usable_cores", "fastest_cpu_settings", "resume", "evaluate", "evaluate_checkpoint",
           "build_tokenizer", "MASK_TOKEN"]

MASK_TOKEN = "<mask>"
SCHEDULES = ("cosine", "noam", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
PARALLELS = ("ddp", "fsdp")


# -- options ------------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Every option of a training run (model hyperparameters live in ``ModelConfig``).

    ``max_steps`` and ``time_budget`` also set where the cosine schedule ends, once, when the run starts: a run
    resumed with larger ones (``resume``, ``qkv train --resume RUN --max-steps N``) stops later but keeps that end,
    so its extra steps run at the learning rate of the schedule's last step. A fresh schedule belongs to a new run
    (starting one from these weights is what ``--init-from``, planned, is for).
    """

    max_steps: int | None = None  # optimizer steps; None: run until time_budget (default 1000 if neither)
    time_budget: float | None = None  # seconds of the trainer's clock (training steps and evaluations)
    batch_size: int = 32
    context: int | None = None  # tokens per training window; default: the model's max_seq_len
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float | None = None  # peak learning rate (cosine, constant: default 1e-3); noam: the factor (default 1)
    schedule: str = "cosine"  # "cosine" (linear warm-up, cosine decay), "noam" (the paper's), "constant"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    adam_eps: float = 1e-8  # the paper uses 1e-9
    grad_clip: float | None = 1.0
    label_smoothing: float = 0.0
    mlm_probability: float = 0.15
    dtype: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on CPU; or "fp32", "bf16"
    device: str = "auto"
    parallel: str = "ddp"  # under torchrun: "ddp" (each process holds the model) or "fsdp" (sharded across them)
    eval_every: int = 200  # steps between evaluations of the validation loss
    eval_seconds: float | None = None  # also evaluate each time the clock passes a multiple of this
    eval_batches: int = 20
    final_eval_batches: int | None = None  # the evaluation after the last step (default: eval_batches)
    save_every: int | None = None  # steps between checkpoints; None: at each evaluation; 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 1337
    val_fraction: float = 0.1
    progress: bool = True  # a progress bar (tqdm) on stderr

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.parallel not in PARALLELS:
            raise ValueError(f"parallel={self.parallel!r} is not one of {', '.join(PARALLELS)}")
        if self.dtype not in PRECISIONS:
            raise ValueError(f"dtype={self.dtype!r} is not one of {', '.join(PRECISIONS)} (fp16 is not offered: "
                             "it overflows without loss scaling; bf16 does not)")
        for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "final_eval_batches",
                     "log_every",
                     "keep_checkpoints", "context"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.time_budget is not None and self.time_budget <= 0:
            raise ValueError(f"time_budget={self.time_budget} must be a positive number of seconds")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be positive")
        if not 0.0 <= self.label_smoothing < 1.0 or not 0.0 < self.mlm_probability < 1.0:
            raise ValueError(f"label_smoothing={self.label_smoothing} must lie in [0, 1) and "
                             f"mlm_probability={self.mlm_probability} in (0, 1)")
        if self.warmup_steps < 0 or (self.schedule == "noam" and self.warmup_steps < 1):
            raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0 (>= 1 for the noam schedule)")
        if self.max_steps is None and self.time_budget is None:
            self.max_steps = 1000

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else (1.0 if self.schedule == "noam" else 1e-3)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


# -- schedules: each formula has one home --------------------------------------------------------------------------
def warmup_cosine(step: int, progress: float, *, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak lr: (step+1)/warmup while warming up, then min + (1-min)·½(1 + cos(π·progress))."""
    if step < warmup:
        return (step + 1) / warmup
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def noam_lr(step: int, d_model: int, warmup: int) -> float:
    """lr = d_model^-0.5 · min(step^-0.5, step · warmup^-1.5) ("Attention Is All You Need", eq. 3), step >= 1."""
    step = max(step, 1)
    return d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)


# -- objectives ---------------------------------------------------------------------------------------------------
class BatchSource(Protocol):
    def batch(self, index: int) -> Any: ...
    def fixed(self, n_batches: int) -> list[Any]: ...


class Objective:
    """How a batch becomes a loss. ``window_extra``: tokens a text window needs beyond the model's context."""

    window_extra = 0

    def __init__(self, tokenizer: Tokenizer, config: TrainConfig):
        self.tokenizer, self.config = tokenizer, config

    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator, *,
             reduction: str = "mean") -> tuple[Tensor, int]:
        """→ (the loss over the predicted tokens, their mean or with ``reduction="sum"`` their sum; how many)."""
        raise NotImplementedError

    def predicted(self, batch: Any, generator: torch.Generator) -> int:
        """How many tokens ``loss(model, batch, generator)`` predicts, known before the forward pass (gradient
        accumulation divides every micro-batch's summed loss by the count of the whole optimizer step)."""
        raise NotImplementedError

    def tokens_in(self, batch: Any) -> int:
        """How many tokens the model reads for this batch (for tokens/s)."""
        return batch.shape[0] * (batch.shape[1] - self.window_extra)


class NextToken(Objective):
    """L = -mean_t log P(x_{t+1} | x_≤t): a window of T+1 tokens gives T inputs and their T successors."""

    window_extra = 1

    def loss(self, model, batch: Tensor, generator, *, reduction: str = "mean"):
        ids = batch.to(self.device(model), non_blocking=True)
        logits = model(ids[:, :-1])  # (batch, T, vocab)
        return (cross_entropy(logits, ids[:, 1:], label_smoothing=self.config.label_smoothing, reduction=reduction),
                self.predicted(batch, generator))

    def predicted(self, batch: Tensor, generator) -> int:
        return batch.shape[0] * (batch.shape[1] - 1)

    @staticmethod
    def device(model: nn.Module) -> torch.device:
        return next(model.parameters()).device


class MaskedLM(Objective):
    """BERT: choose 15% of tokens; of those 80% → [MASK], 10% → a random token, 10% kept; predict the chosen."""

    def __init__(self, tokenizer: Tokenizer, config: TrainConfig):
        super().__init__(tokenizer, config)
        if tokenizer.mask_id is None:
            raise ValueError(f"masked-language modelling needs a mask token, and this {tokenizer.kind} tokenizer "
                             f"has none; build it with special_tokens=[{MASK_TOKEN!r}]")

    def choose(self, shape: torch.Size, generator: torch.Generator) -> Tensor:
        """The positions to predict, (batch, T) bool: the first draw from ``generator``, at least one."""
        chosen = torch.rand(shape, generator=generator) < self.config.mlm_probability
        if not chosen.any():
            chosen[0, 0] = True  # a batch with nothing to predict would give a 0/0 loss
        return chosen

    def predicted(self, batch: Tensor, generator: torch.Generator) -> int:
        """The number of chosen tokens, drawn as ``corrupt`` draws them from a generator in the same state."""
        return int(self.choose(batch.shape, generator).sum())

    def corrupt(self, ids: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """ids (batch, T) → (inputs, chosen tokens replaced; targets: the chosen ids, IGNORE_INDEX elsewhere)."""
        shape = ids.shape
        chosen = self.choose(shape, generator)
        how = torch.rand(shape, generator=generator)
        random_ids = torch.randint(0, self.tokenizer.vocab_size, shape, generator=generator)
        inputs = torch.where(chosen & (how < 0.8), self.tokenizer.mask_id, ids)
        inputs = torch.where(chosen & (how >= 0.8) & (how < 0.9), random_ids, inputs)
        return inputs, torch.where(chosen, ids, IGNORE_INDEX)

    def loss(self, model, batch: Tensor, generator, *, reduction: str = "mean"):
        inputs, targets = self.corrupt(batch, generator)
        count = int((targets != IGNORE_INDEX).sum())  # counted on the CPU: no wait for the device
        device = NextToken.device(model)
        hidden = model(inputs.to(device))  # (batch, T, d_model)
        logits = getattr(model, "module", model).logits(hidden)  # the model itself under DistributedDataParallel
        return cross_entropy(logits, targets.to(device), label_smoothing=self.config.label_smoothing,
                             reduction=reduction), count


@torch.no_grad()
def evaluate(model: nn.Module, objective: Objective, batches: list, *, seed: int = 0, bf16: bool = False,
             share: tuple[int, int] = (0, 1)) -> float:
    """Mean loss per predicted token over ``batches`` (model in eval mode; its mode is restored after).

    ``share=(r, N)``: under torchrun, process r of N evaluates batches r, r + N, ... and the sums are added up
    across the processes, so the mean is the one a single process computes."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device_type = NextToken.device(model).type
    rank, world = share
    for i in range(rank, len(batches), world):
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            loss, n = objective.loss(model, batches[i], torch.Generator().manual_seed(seed + i))
        total += float(loss) * n
        count += n
    model.train(was_training)
    if world > 1:
        total, count = _all_reduce([total, float(count)], "sum")
    return total / max(count, 1)


# model_type → objective; the encoder-decoder objective adds "seq2seq" here.
OBJECTIVES: dict[str, Callable[[Tokenizer, TrainConfig], Objective]] = {"decoder": NextToken, "encoder": MaskedLM}


# -- optimizer ----------------------------------------------------------------------------------------------------
def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: never on norms, biases, token/positional/segment embeddings."""
    no_decay_modules = (nn.Embedding, nn.LayerNorm, RMSNorm, PositionalEncoding)
    decay, no_decay = [], []
    seen: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            exempt = isinstance(module, no_decay_modules) or name == "bias" or p.dim() < 2
            (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# -- the loop -----------------------------------------------------------------------------------------------------
class TrainingDiverged(RuntimeError):
    """The loss (or the gradient) became NaN or infinite."""


class TrainingInterrupted(RuntimeError):
    """SIGINT / SIGTERM arrived; a checkpoint was saved at ``checkpoint``."""

    def __init__(self, message: str, checkpoint: Path):
        super().__init__(message)
        self.checkpoint = checkpoint


class TrainResult(NamedTuple):
    step: int
    elapsed: float  # seconds on the trainer's clock
    val_loss: float
    tokens_per_s: float
    checkpoint: Path | None
    history: list[dict]  # one entry per evaluation: step, elapsed_s, val_loss
    loss_curve: Path | None = None  # loss.png, when matplotlib could draw it


CSV_FIELDS = ["step", "elapsed_s", "tokens", "lr", "train_loss", "val_loss", "val_ppl", "tokens_per_s"]



def adamw_kernel(device: torch.device) -> dict:
    """AdamW's implementation: one fused kernel on CPU and CUDA (4-6x faster than foreach on the CPU here)."""
    fused = device.type in ("cpu", "cuda")
    return {"fused": True if fused else None, "foreach": None if fused else True}

class Trainer:
    """Trains ``model`` on batches from ``train_data`` with ``objective``; writes checkpoints under ``out_dir``."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, train_data: BatchSource, val_data: BatchSource,
                 config: TrainConfig, out_dir: str | Path, *, objective: Objective | None = None,
                 run_info: dict | None = None, print_fn: Callable[[str], None] | None = None):
        self.config, self.tokenizer, self.out_dir = config, tokenizer, Path(out_dir)
        self.rank, self.world = process_rank()
        self.device = torch.device(config.device if config.device != "auto" else
                                   "cuda" if torch.cuda.is_available() else "cpu")
        if self.world > 1 and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # one GPU per process
        self.model = model.to(self.device).train()
        # What a training step calls: the model itself, or under torchrun its DistributedDataParallel wrapper,
        # which all-reduces (averages) the gradients across processes during the backward pass, or the model
        # with its parameters sharded across the processes (FSDP: gathered per block for forward and backward,
        # gradients reduce-scattered, each process updating its shard).
        self.sharded = self.world > 1 and config.parallel == "fsdp"
        self.replica: nn.Module = self.model if self.world == 1 else _replicate(self.model, self.device,
                                                                                  config.parallel)
        self.objective = objective or OBJECTIVES[model.model_type](tokenizer, config)
        self.train_data, self.val_data = train_data, val_data
        self.val_batches = val_data.fixed(config.eval_batches)
        self.bf16 = config.dtype == "bf16" or (config.dtype == "auto" and self.device.type == "cuda")
        self.optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.peak_lr,
                                           betas=(config.beta1, config.beta2), eps=config.adam_eps,
                                           **adamw_kernel(self.device))
        self.run_info = dict(run_info or {})
        self.print = print_fn or say_once  # one process speaks, writes metrics and saves checkpoints
        self.step = 0  # optimizer steps taken
        self.horizon = (config.max_steps, config.time_budget)  # where the lr schedule ends: kept when resumed
        self.lr_ratio = 1.0  # the last step's learning rate / peak_lr (a finished cosine schedule stays there)
        self.elapsed = 0.0  # the trainer's clock: seconds spent in training steps and evaluations
        self.train_time = 0.0  # seconds in training steps only (for tokens/s)
        self.tokens = 0
        self.last_checkpoint: Path | None = None
        self.history: list[dict] = []
        self._stop_signal: int | None = None  # set by the signal handler, at any moment
        self._agreed_stop: int | None = None  # under torchrun: the stop signal every process has agreed on
        self._resumed_at = 0  # the step a resumed run started from (its first step is printed)
        self._bar = None

    # -- schedule -------------------------------------------------------------------------------------------------
    def progress(self) -> float:
        """How far along the schedule the run is, 0 → 1: by steps, by the clock, whichever is further, against the
        schedule's end (``horizon``: the max_steps and time_budget the run started with)."""
        max_steps, time_budget = self.horizon
        return max(self.step / max_steps if max_steps else 0.0,
                   self.elapsed / time_budget if time_budget else 0.0)

    def lr_at(self, step: int) -> float:
        """The learning rate of step ``step`` (counted from 0).

        A cosine schedule ends where the run set out to end. A run continued beyond it (``--resume`` with a larger
        ``--max-steps`` or ``--time-budget``) runs the extra steps at the learning rate of the last step taken,
        the finished schedule's final one; a fresh schedule belongs to a new run. The noam and constant
        schedules are defined at every step and simply go on."""
        c = self.config
        if c.schedule == "noam":
            return c.peak_lr * noam_lr(step + 1, self.model.config.d_model, c.warmup_steps)
        if c.schedule == "constant":
            return c.peak_lr
        if self.progress() >= 1.0:
            return c.peak_lr * self.lr_ratio
        return c.peak_lr * warmup_cosine(step, self.progress(), warmup=c.warmup_steps, min_ratio=c.min_lr_ratio)

    def _done(self) -> bool:
        c = self.config
        return (c.max_steps is not None and self.step >= c.max_steps) or (
            c.time_budget is not None and self.elapsed >= c.time_budget)

    # -- one step -------------------------------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _generator(self, index: int) -> torch.Generator:
        """The random numbers of micro-batch ``index`` (MLM masks): a pure function of (seed, index)."""
        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + index)

    def train_step(self) -> tuple[float, float, int]:
        """One optimizer step over ``grad_accum`` micro-batches → (loss, gradient norm, tokens).

        The step's loss is the mean over every token it predicts, in all its micro-batches and under torchrun in
        every process: the gradient, the loss and the tokens of one batch holding them all. Each micro-batch adds
        its summed loss divided by the step's count of predicted tokens, counted (and added across processes)
        before the first backward pass; a mean of per-micro-batch means would weigh a micro-batch of 10 masked
        tokens like one of 18."""
        c = self.config
        lr = self.lr_at(self.step)
        self.lr_ratio = lr / c.peak_lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # The data positions: under torchrun each process takes every world-th batch, so N processes see
        # exactly the batches that one process would with grad_accum x N.
        indices = [(self.step * c.grad_accum + micro) * self.world + self.rank for micro in range(c.grad_accum)]
        batches = [self.train_data.batch(index) for index in indices]
        predicted = sum(self.objective.predicted(b, self._generator(i)) for i, b in zip(indices, batches, strict=True))
        n_tokens = sum(self.objective.tokens_in(b) for b in batches)
        if self.world > 1:
            predicted, n_tokens = (int(n) for n in _all_reduce([float(predicted), float(n_tokens)], "sum"))
        # DDP and FSDP average the processes' gradients: the factor world turns that average into the sum
        scale = self.world / max(predicted, 1)
        summed = torch.zeros((), device=self.device)
        for micro, (index, batch) in enumerate(zip(indices, batches, strict=True)):
            last = micro == c.grad_accum - 1  # gradients are averaged across processes once, after the last
            with self._gradient_sync(last):
                with self._autocast():
                    loss, _ = self.objective.loss(self.replica, batch, self._generator(index), reduction="sum")
                (loss * scale).backward()
            summed += loss.detach()
        total = float(summed)  # one wait for the device per step
        if self.world > 1:  # every process reports the loss over all of them (NaN anywhere is NaN everywhere)
            total = _all_reduce([total], "sum")[0]
        total /= max(predicted, 1)
        # ||g|| over every parameter (sharded ones included); with no clipping, the bound is infinite
        norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip or math.inf))
        if math.isfinite(total) and math.isfinite(norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, norm, n_tokens

    def _gradient_sync(self, now: bool):
        """Average the gradients across processes on this backward pass, or (accumulating) not yet."""
        if self.world == 1 or now:
            return contextlib.nullcontext()
        return _fsdp_accumulating(self.model) if self.sharded else self.replica.no_sync()

    def evaluate(self, final: bool = False) -> float:
        """Mean validation loss per predicted token over the fixed evaluation batches."""
        c = self.config
        batches = self.val_batches
        if final and c.final_eval_batches not in (None, c.eval_batches):
            batches = self.val_data.fixed(c.final_eval_batches)
        if not self.sharded:  # each process evaluates its share of the batches
            return evaluate(self.model, self.objective, batches, seed=c.seed, bf16=self.bf16,
                            share=(self.rank, self.world))
        # Under FSDP every forward is a collective, so every process evaluates every batch.
        loss = evaluate(self.model, self.objective, batches, seed=c.seed, bf16=self.bf16)
        self.model.reshard()  # a forward without backward leaves the root's parameters gathered: shard them again
        return loss

    def _evaluation_due(self, clock_before_step: float) -> bool:
        c = self.config
        if self.step % c.eval_every == 0:
            return True
        return bool(c.eval_seconds) and int(self.elapsed // c.eval_seconds) > int(clock_before_step // c.eval_seconds)

    # -- the loop -------------------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train until ``max_steps`` or ``time_budget``; evaluate, log and save along the way."""
        c = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        save_every = c.eval_every if c.save_every is None else c.save_every
        val_loss = float("nan")
        window_loss, window_steps = 0.0, 0
        with self._signals(), self._progress_bar(), _MetricsLog(self.out_dir, self.rank == 0, self.step) as metrics:
            while not self._done():
                clock_before_step = self.elapsed
                start = time.perf_counter()
                loss, norm, n_tokens = self.train_step()
                spent = time.perf_counter() - start
                self.elapsed += spent
                self.train_time += spent
                self._agree()
                self.step += 1
                self.tokens += n_tokens
                if not (math.isfinite(loss) and math.isfinite(norm)):
                    raise TrainingDiverged(self._divergence_message(loss, norm))
                window_loss, window_steps = window_loss + loss, window_steps + 1
                if self.step == 1 or self.step == self._resumed_at + 1:
                    self.print(f"step {self.step}: loss {loss:.4f}, {spent:.2f} s")
                done = self._done()
                evaluating = done or self._evaluation_due(clock_before_step)
                if self.step % c.log_every == 0 or evaluating:
                    row = {"step": self.step, "elapsed_s": round(self.elapsed, 3), "tokens": self.tokens,
                           "lr": self.optimizer.param_groups[0]["lr"], "train_loss": window_loss / window_steps,
                           "tokens_per_s": round(self.tokens_per_s)}
                    window_loss, window_steps = 0.0, 0
                    if evaluating:
                        start, at = time.perf_counter(), self.elapsed
                        val_loss = self.evaluate(final=done)
                        if not done:  # evaluations during training count on the clock; the final one does not
                            self.elapsed += time.perf_counter() - start
                            self._agree()
                        row.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50.0)))
                        self.history.append({"step": self.step, "elapsed_s": at, "val_loss": val_loss})
                        self._say(f"step {self.step:>6} | {self.elapsed:7.1f} s | train {row['train_loss']:.4f} | "
                                  f"val {val_loss:.4f} (ppl {row['val_ppl']:.2f}) | "
                                  f"{self.tokens_per_s:,.0f} tok/s")
                    metrics.write(row)
                    self._update_bar(row["train_loss"])
                stop = self._stop_signal if self.world == 1 else self._agreed_stop
                if stop is not None:
                    path = self.save()
                    name = signal.Signals(stop).name
                    launcher = f"torchrun --nproc_per_node={self.world} -m qkv train" if self.world > 1 else "qkv train"
                    raise TrainingInterrupted(
                        f"{name} at step {self.step}: saved checkpoint {path}; continue with "
                        f"`{launcher} --resume {path.parent}`", path)
                if save_every and self.step % save_every == 0 and not done:
                    self.save()
            if not self.history or self.history[-1]["step"] != self.step:
                val_loss = self.evaluate(final=True)
                self.history.append({"step": self.step, "elapsed_s": self.elapsed, "val_loss": val_loss})
            checkpoint = self.save()
        curve = self._plot()
        return TrainResult(self.step, self.elapsed, val_loss, self.tokens_per_s, checkpoint, self.history, curve)

    def _agree(self) -> None:
        """Under torchrun, every process takes the slowest clock and any stop signal, so all of them stop,
        evaluate and save at the same step."""
        if self.world > 1:  # a signal arriving after this call waits for the next one (then all see it)
            stop = -1.0 if self._stop_signal is None else float(self._stop_signal)
            self.elapsed, stop = _all_reduce([self.elapsed, stop], "max")
            self._agreed_stop = None if stop < 0 else int(stop)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_time if self.train_time else 0.0

    def _divergence_message(self, loss: float, norm: float) -> str:
        what = f"loss became {loss}" if not math.isfinite(loss) else f"gradient norm became {norm}"
        where = (f"the last good checkpoint, {self.last_checkpoint}, is left untouched"
                 if self.last_checkpoint else "no checkpoint had been saved yet")
        lr = self.optimizer.param_groups[0]["lr"]
        return (f"training diverged: {what} at step {self.step}; stopped without saving, {where}. Usual causes: "
                f"a learning rate too high (it was {lr:.3g}: try a tenth), a missing 1/sqrt(d_k) attention scale, "
                f"or fp16 overflow (train in bf16 or fp32)")

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything beyond the weights that an exact continuation needs."""
        rng = {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": list(random.getstate())}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        if self.world > 1:  # each process draws its own dropout masks: keep every process's generators
            import torch.distributed as dist

            every: list = [None] * self.world
            dist.all_gather_object(every, rng)
            rng = {**rng, "processes": every}
        return {"step": self.step, "elapsed": self.elapsed, "train_time": self.train_time, "tokens": self.tokens,
                "data_position": self.step * self.config.grad_accum * self.world, "world_size": self.world,
                "optimizer": _full_optimizer_state(self.model, self.optimizer) if self.sharded
                else self.optimizer.state_dict(),
                "schedule": {"name": self.config.schedule, "lr": self.config.peak_lr,
                             "warmup_steps": self.config.warmup_steps, "progress": self.progress(),
                             "horizon": list(self.horizon), "lr_ratio": self.lr_ratio},
                "rng": rng, "train_config": asdict(self.config), "run": self.run_info, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.world:
            how = f"torchrun --nproc_per_node={saved_world} -m qkv train --resume ..." if saved_world > 1 else \
                "qkv train --resume ... (without torchrun)"
            raise ValueError(f"this run trained as {saved_world} process(es) and is resuming as {self.world}; which "
                             f"batches come next depends on it, so resume it as it ran: {how}")
        self.step, self.elapsed, self.tokens = int(state["step"]), float(state["elapsed"]), int(state["tokens"])
        self.train_time = float(state.get("train_time", self.elapsed))
        self._resumed_at = self.step
        self.history = list(state.get("history", []))
        if self.sharded:  # every process reads the whole optimizer state and keeps its own shard of it
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.model, self.optimizer, optim_state_dict=state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        # The schedule keeps the end the run started with, and the last step's lr (older runs: from their settings)
        schedule, saved = state.get("schedule", {}), state["train_config"]
        self.horizon = tuple(schedule.get("horizon", (saved["max_steps"], saved["time_budget"])))
        self.lr_ratio = schedule.get("lr_ratio", self.optimizer.param_groups[0]["lr"] / schedule.get("lr", 1.0))
        kernel = adamw_kernel(self.device)
        for group in self.optimizer.param_groups:  # the saved flags belong to the device that saved them
            group["fused"], group["foreach"] = kernel["fused"], kernel["foreach"]
            group["betas"] = tuple(group["betas"])
        rng = state["rng"]
        rng = rng["processes"][self.rank] if "processes" in rng else rng
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        np.random.set_state(_numpy_state(rng["numpy"]))
        version, internal, gauss = rng["python"]
        random.setstate((version, tuple(internal), gauss))

    def save(self) -> Path:
        state = self.state_dict()  # under torchrun every process takes part (its random state is gathered)
        weights = _full_model_state(self.model) if self.sharded else None  # the shards, gathered on process 0
        if self.rank == 0:
            self.last_checkpoint = save_run_checkpoint(self.out_dir, self.step, self.model, self.tokenizer,
                                                       trainer_state=state, keep=self.config.keep_checkpoints,
                                                       weights=weights)
        if self.world > 1:  # the others learn where it went once it is complete
            import torch.distributed as dist

            shared = [self.last_checkpoint]
            dist.broadcast_object_list(shared, src=0)
            self.last_checkpoint = shared[0]
        return self.last_checkpoint

    # -- interruption, progress, pictures -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _signals(self):
        """SIGINT/SIGTERM set a flag: the loop finishes its step, saves, and stops. A second Ctrl-C stops at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_signal = signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    @contextlib.contextmanager
    def _progress_bar(self):
        bar = None
        if self.config.progress and self.rank == 0:
            try:
                from tqdm.auto import tqdm

                c = self.config
                total = c.max_steps if c.max_steps else int(c.time_budget)
                bar = tqdm(total=total, initial=self.step if c.max_steps else int(self.elapsed),
                           unit="step" if c.max_steps else "s", dynamic_ncols=True, leave=False,
                           bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}{postfix}]")
            except ImportError:
                pass
        self._bar = bar
        try:
            yield
        finally:
            if bar is not None:
                bar.close()
            self._bar = None

    def _update_bar(self, train_loss: float) -> None:
        if self._bar is None:
            return
        c = self.config
        self._bar.n = self.step if c.max_steps else min(int(self.elapsed), int(c.time_budget))
        self._bar.set_postfix_str(f"loss {train_loss:.3f}, {self.tokens_per_s:,.0f} tok/s", refresh=True)

    def _say(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=sys.stdout)
            sys.stdout.flush()
        else:
            self.print(message)

    def _plot(self) -> Path | None:
        if self.rank != 0:
            return None
        try:
            return plot_loss_curve(self.out_dir / "metrics.csv", self.out_dir / "loss.png")
        except ImportError:
            return None


# -- several processes (torchrun) -------------------------------------------------------------------------------


def process_rank() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them (RANK, WORLD_SIZE); (0, 1) for a plain run."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def say_once(message: str) -> None:
    """Print, from the first process only when torchrun runs several."""
    if process_rank()[0] == 0:
        print(message, flush=True)


def _replicate(model: nn.Module, device: torch.device, parallel: str = "ddp") -> nn.Module:
    """Join torchrun's process group (NCCL between GPUs, Gloo between CPU processes), then either wrap the model in
    DistributedDataParallel (the same weights in every process, gradients averaged during backward) or shard it
    with FSDP, one unit per block plus the rest (embeddings, final norm, output projection)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if parallel == "ddp":
        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise ImportError(f"parallel='fsdp' needs torch >= 2.6 (fully_shard); this is torch {torch.__version__}: "
                          "upgrade torch, or train with parallel='ddp'") from None
    for block in [m for m in model.modules() if isinstance(m, (EncoderBlock, DecoderBlock))]:
        fully_shard(block)
    fully_shard(model)
    return model


@contextlib.contextmanager
def _fsdp_accumulating(model: nn.Module):
    """FSDP's counterpart of DDP's no_sync: keep this backward pass's gradients local and unreduced."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _full_model_state(model: nn.Module) -> dict[str, Tensor]:
    """A sharded model's whole state dict, gathered onto process 0's CPU (the others get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """A sharded model's whole AdamW state (keyed by parameter name), gathered onto process 0's CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _all_reduce(values: list[float], op: str) -> list[float]:
    """The element-wise sum or max of ``values`` over every process."""
    import torch.distributed as dist

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def _numpy_state(saved: list | None = None):
    """numpy's global RNG state ↔ a JSON-friendly list."""
    if saved is None:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        return [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]
    name, keys, pos, has_gauss, gauss = saved
    return name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss


class _MetricsLog:
    """metrics.csv (continued on resume) and TensorBoard event files when ``tensorboard`` is installed.

    Opening it keeps the header and the complete rows up to ``start_step`` (the step the run starts from) and
    nothing else, so whatever a kill left behind (an empty file, a torn last line, rows logged after the
    checkpoint the run resumes from) the file reads as one run with each step once."""

    def __init__(self, out_dir: Path, active: bool = True, start_step: int = 0):
        self.path = out_dir / "metrics.csv"
        self.out_dir = out_dir
        self.active = active  # under torchrun only the first process writes
        self.start_step = start_step

    def _rows_up_to(self, step: int) -> list[dict]:
        if not self.path.is_file():
            return []
        lines = self.path.read_text().splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):
            lines.pop()  # a row cut short by a kill
        rows = []
        for row in csv.DictReader(lines, fieldnames=CSV_FIELDS):
            if None in row or None in row.values() or not row["step"].isdigit():  # the header, a garbled row
                continue
            if int(row["step"]) <= step:
                rows.append(row)
        return rows

    def __enter__(self):
        if not self.active:
            return self
        rows = self._rows_up_to(self.start_step)
        text = [",".join(CSV_FIELDS) + "\r\n"] + [",".join(row[k] for k in CSV_FIELDS) + "\r\n" for row in rows]
        write_atomic(self.path, "".join(text).encode())
        self.file = self.path.open("a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=CSV_FIELDS)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out_dir / "tensorboard"))
        except ImportError:
            self.tb = None
        return self

    def write(self, row: dict) -> None:
        if not self.active:
            return
        fault_point("metrics:before-row")
        self.writer.writerow(row)
        self.file.flush()
        if self.tb is not None:
            for key in ("train_loss", "val_loss", "lr", "tokens_per_s"):
                if key in row:
                    self.tb.add_scalar(key, row[key], row["step"])

    def __exit__(self, *exc):
        if not self.active:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def plot_loss_curve(csv_path: str | Path, png_path: str | Path) -> Path:
    """Training and validation loss against the trainer's clock, from metrics.csv."""
    from .viz import save_figure
    from .viz.heatmap import _pyplot

    rows = list(csv.DictReader(Path(csv_path).open()))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("train_loss", "-"), ("val_loss", "o-")):
        points = [(float(r["elapsed_s"]), float(r[key])) for r in rows if r.get(key)]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=key.replace("_", " "), markersize=3)
    ax.set_xlabel("seconds (trainer's clock)")
    ax.set_ylabel("cross-entropy (nats per token)")
    if rows:
        ax.set_title(f"{rows[-1]['step']} steps, {int(rows[-1]['tokens']):,} tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, png_path)


# -- a whole run: corpus → tokenizer → tokens → model → trainer -----------------------------------------------------
def build_tokenizer(corpus: Corpus, kind: str, model_type: str, bpe_vocab_size: int | None) -> Tokenizer:
    """A tokenizer trained on ``corpus``: "char" or byte-level "bpe"; masked-LM models get a mask token."""
    special = [MASK_TOKEN] if model_type == "encoder" else []
    if kind == "char":
        return Tokenizer.char(corpus.text, special_tokens=special)
    if kind == "bpe":
        return Tokenizer.bpe(corpus.text, vocab_size=bpe_vocab_size or 1024, special_tokens=special)
    raise ValueError(f"tokenizer={kind!r} is not one of char, bpe")


def train(model_config: ModelConfig | None = None, config: TrainConfig | None = None, *,
          data: str | Path | None = None, out_dir: str | Path = "runs/train", tokenizer: str = "char",
          model_type: str | None = None, overwrite: bool = False,
          print_fn: Callable[[str], None] | None = None) -> TrainResult:
    """Train a model from scratch on ``data`` (default: the bundled tiny Shakespeare); checkpoints go to ``out_dir``.

    ``model_config.vocab_size`` is the BPE vocabulary size to train; a character tokenizer sets its own. An
    ``out_dir`` that already holds a run is refused unless ``overwrite`` (its checkpoints and metrics are deleted).
    """
    say = print_fn or say_once
    config = config or TrainConfig()
    model_config = model_config or ModelConfig.preset("tiny-decoder")
    model_type = model_type or model_class_for(model_config).model_type
    if model_type not in OBJECTIVES:
        raise ValueError(f"no training objective for model_type={model_type!r} yet; trainable: "
                         f"{', '.join(OBJECTIVES)}")
    out_dir = Path(out_dir)
    with claim_run_directory(out_dir, overwrite=overwrite, primary=process_rank()[0] == 0):
        corpus = read_corpus(data)
        tok = build_tokenizer(corpus, tokenizer, model_type, model_config.vocab_size)
        model_config = model_config.replace(vocab_size=tok.vocab_size)
        torch.manual_seed(config.seed)
        model = build_model(model_config, model_type)
        # the absolute path, so that --resume and qkv eval work from any directory
        source = corpus.source if corpus.source == BUNDLED else str(Path(corpus.source).resolve())
        run_info = {"recipe": RECIPES[model_type], "data": source, "data_sha256": corpus.sha256,
                    "tokenizer": tokenizer, "model_type": model_type}
        trainer, splits = _make_trainer(model, tok, corpus, config, out_dir, run_info, say)
        say(f"training a {model.num_parameters():,}-parameter {type(model).__name__} on {corpus.source} "
            f"({len(splits.train):,} train / {len(splits.val):,} validation tokens, {tok.kind} vocabulary "
            f"{tok.vocab_size}) on {trainer.device}")
        return trainer.fit()


# model_type → the recipe a run records (``run["recipe"]``): what resume and eval dispatch on
RECIPES = {"decoder": "language-model", "encoder": "masked-lm", "seq2seq": "translation"}


def run_recipe(run: dict) -> str:
    """The recipe a run's metadata names (runs from before ``recipe`` was recorded: inferred)."""
    if "recipe" in run:
        return run["recipe"]
    return "translation" if run.get("task") == "translation" else RECIPES.get(run.get("model_type"), "language-model")


def _run_corpus(run: dict, data: str | Path | None, directory: Path, fix: str) -> Corpus:
    """``data`` if given, else the text the run trained on (its recorded path), named clearly when it is gone."""
    if data is None and run.get("data") not in (None, BUNDLED) and not Path(run["data"]).exists():
        raise FileNotFoundError(f"{directory} trained on {run['data']}, which is not there any more; {fix}")
    return read_corpus(data if data is not None else run.get("data"))


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask on Linux; all of them elsewhere)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def fastest_cpu_settings(model_config: ModelConfig, batch_size: int, context: int | None = None, *,
                         threads: tuple[int, ...] | None = None, dtypes: tuple[str, ...] = ("fp32", "bf16"),
                         seconds: float = 0.5) -> tuple[tuple[int, str], dict[tuple[int, str], float]]:
    """Time training steps of this model shape for each (threads, dtype) → (the fastest, {setting: tokens/s}).

    Measured, not guessed, because both answers depend on the machine and on what else runs on it. Threads: on a
    quiet machine every core helps; when another program holds a core, threads that wait for each other at every
    matrix multiply can make two threads several times slower than one. dtype: bf16 autocast multiplies 2-3x
    faster than fp32 on CPUs with bf16 instructions (AVX512_BF16, AMX) and about 2x slower on those without.
    A throwaway copy of the model trains on a random batch for about ``seconds`` per setting, in two interleaved
    rounds; torch's thread count is left at the fastest setting's.
    """
    threads = threads or tuple(sorted({1, usable_cores()}))
    context = context or model_config.max_seq_len
    generator = torch.Generator().manual_seed(0)
    model = build_model(model_config.replace(dropout=0.0), model_class_for(model_config).model_type).train()
    batch = torch.randint(0, model_config.vocab_size, (batch_size, context + 1), generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **adamw_kernel(torch.device("cpu")))

    def step(dtype: str) -> None:
        inputs = batch[:, :-1]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            out = model(inputs, inputs) if model.model_type == "seq2seq" else model(inputs)
            logits = model.logits(out) if model.model_type == "encoder" else out
            loss = cross_entropy(logits, batch[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    settings = [(n, dtype) for dtype in dtypes for n in threads]
    rates: dict[tuple[int, str], list[float]] = {setting: [] for setting in settings}
    for _ in range(2):
        for n, dtype in settings:
            torch.set_num_threads(n)
            step(dtype)  # warm-up at this setting
            steps, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < seconds / 2 or steps < 2:
                step(dtype)
                steps += 1
            rates[(n, dtype)].append(steps * batch_size * context / elapsed)
    best = {setting: max(r) for setting, r in rates.items()}
    fastest = max(best, key=best.get)
    torch.set_num_threads(fastest[0])
    return fastest, best


def _make_trainer(model, tok: Tokenizer, corpus: Corpus, config: TrainConfig, out_dir, run_info: dict,
                  say) -> tuple[Trainer, TokenSplits]:
    context = config.context or model.config.max_seq_len
    if context > model.config.max_seq_len:
        raise ValueError(f"context={context} is longer than max_seq_len={model.config.max_seq_len}; "
                         f"lower --context or raise --max-seq-len")
    objective = OBJECTIVES[model.model_type](tok, config)
    splits = load_tokens(corpus, tok, val_fraction=config.val_fraction)
    window = context + objective.window_extra
    train_data = WindowBatches(splits.train, window, config.batch_size, seed=config.seed, name="train")
    val_data = WindowBatches(splits.val, window, config.batch_size, seed=config.seed, name="validation")
    trainer = Trainer(model, tok, train_data, val_data, config, out_dir, objective=objective, run_info=run_info,
                      print_fn=say)
    return trainer, splits


# Options that may change when a run resumes: none changes what a step computes, except lr (a deliberate choice).
RESUMABLE_OPTIONS = ("max_steps", "time_budget", "eval_every", "eval_seconds", "eval_batches", "final_eval_batches",
                     "save_every", "keep_checkpoints", "log_every", "progress", "device", "lr")


def resume(path: str | Path, overrides: dict | None = None, *, data: str | Path | None = None,
           out_dir: str | Path | None = None, print_fn: Callable[[str], None] | None = None) -> TrainResult:
    """Continue the run saved at ``path`` (a checkpoint or a run directory) exactly where it stopped.

    ``overrides`` may move where it stops (max_steps, time_budget), not its learning-rate schedule: steps beyond
    the schedule's end run at its final learning rate (see ``TrainConfig``).

    The run directory is claimed first (see ``claim_run_directory``): a run still training there is refused, and
    what a killed save left is tidied before the checkpoint is chosen."""
    say = print_fn or say_once
    overrides = dict(overrides or {})
    fixed = sorted(set(overrides) - set(RESUMABLE_OPTIONS))
    if fixed:
        raise ValueError(f"--resume continues a run with its saved settings; {', '.join(fixed)} cannot change "
                         f"(only {', '.join(RESUMABLE_OPTIONS)} can); drop them or start a new run")
    run_dir = Path(out_dir) if out_dir is not None else run_directory_of(path)
    with claim_run_directory(run_dir, resuming=True, primary=process_rank()[0] == 0):
        state, directory = load_trainer_state(path)
        model, tok, _ = load_checkpoint(directory)
        config = TrainConfig(**{**state["train_config"], **overrides})
        run = state["run"]
        if run_recipe(run) == "translation":  # a parallel-file run: its batches come from qkv.translation
            from .translation import resume_translation

            return resume_translation(model, tok, state, directory, config, data=data, out_dir=run_dir,
                                      print_fn=say)
        corpus = _run_corpus(run, data, directory, "pass --data with the same text to resume")
        if corpus.sha256 != run["data_sha256"]:
            raise ValueError(f"the data {corpus.source} differs from the text this run trained on "
                             f"({run['data']}); pass the same --data to resume, or start a new run")
        trainer, _ = _make_trainer(model.train(), tok, corpus, config, run_dir, run, say)
        trainer.load_state_dict(state)
        trainer.last_checkpoint = directory
        say(f"resuming {directory} at step {trainer.step} ({trainer.elapsed:.1f} s on the clock)")
        return trainer.fit()


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path | None = None, *, split: str = "val",
                        batch_size: int = 32, context: int | None = None, max_batches: int = 10_000) -> dict:
    """Loss (nats per predicted token, no label smoothing) and perplexity exp(loss) of a checkpoint.

    Dispatches on the recipe the run recorded. A language model or masked LM: on a text, ``data`` defaulting to
    the one the run trained on; ``split`` "val" takes its last 10%, "all" the whole text. A translation run: the
    target-side loss on its validation pairs, rebuilt from the split saved with it (``data``: another parallel
    file, split the same way; "all": every pair of the file).
    """
    if split not in ("val", "all"):
        raise ValueError(f"split={split!r} is not one of val, all")
    model, tok, directory = load_checkpoint(checkpoint)
    run = read_run_info(directory)  # {} for a checkpoint without training state: the bundled corpus
    if run_recipe(run) == "translation":
        if context is not None:
            raise ValueError(f"{directory} is a translation run, evaluated on whole sentence pairs; drop --context")
        from .translation import validation_pair_batches  # registers the seq2seq objective too

        batches, source = validation_pair_batches(run, tok, model.config.max_seq_len, directory, data=data,
                                                  split=split, max_batches=max_batches)
    if model.model_type not in OBJECTIVES:
        raise ValueError(f"no evaluation objective for model_type={model.model_type!r}")
    objective = OBJECTIVES[model.model_type](tok, TrainConfig())
    if run_recipe(run) != "translation":
        corpus = _run_corpus(run, data, directory, "pass --data with the text to evaluate on")
        context = context or model.config.max_seq_len
        if context > model.config.max_seq_len:
            raise ValueError(f"context={context} is longer than the model's max_seq_len="
                             f"{model.config.max_seq_len}; lower --context")
        splits = load_tokens(corpus, tok)
        tokens = splits.val if split == "val" else np.concatenate([splits.train, splits.val])
        batches = WindowBatches(tokens, context + objective.window_extra, batch_size,
                                name="validation" if split == "val" else "text").fixed(max_batches)
        source = corpus.source
    loss = evaluate(model, objective, batches)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "tokens": sum(objective.tokens_in(b) for b in batches), "data": source, "split": split,
            "checkpoint": str(directory)}
