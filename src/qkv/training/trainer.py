"""The trainer: one loop for every model shape and every recipe.

It owns what every objective shares: AdamW with weight-decay groups, the learning-rate schedule, token-weighted
gradient accumulation and clipping, mixed precision, evaluation, checkpoints with everything an exact
continuation needs, and the divergence guard. What a run does around its steps (signals, progress, metrics, the
loss curve) comes as callbacks (:mod:`qkv.training.callbacks`); where its batches, tokenizer and model come from
is a recipe's business (:mod:`qkv.recipes`): the trainer knows none.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ..checkpoint import save_run_checkpoint
from ..devices import resolve_device
from ..losses import perplexity, perplexity_text
from ..tokenizers import Tokenizer
from .callbacks import Callback, default_callbacks
from .distributed import (
    all_reduce,
    broadcast_object,
    fsdp_accumulating,
    full_model_state,
    full_optimizer_state,
    gather_objects,
    process_rank,
    replicate,
    say_once,
)
from .memory import checkpoint_activations
from .objectives import OBJECTIVES, BatchSource, Objective, mean_loss
from .optimizer import adamw_kernel, param_groups, upgrade_saved_state
from .options import TrainConfig
from .schedules import learning_rate

__all__ = ["Trainer", "TrainResult", "TrainingDiverged", "TrainingInterrupted"]


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


class Trainer:
    """Trains ``model`` on batches from ``train_source`` with ``objective``; writes checkpoints under ``out_dir``.

    ``train_source`` and ``val_source`` are batch sources (``batch(index)``, ``fixed(n)``: see ``BatchSource``),
    built by a recipe from its data.

    ``objective`` defaults to the model's (``OBJECTIVES[model.model_type]``), ``callbacks`` to
    ``default_callbacks()`` (stop on a signal, metrics.csv, a progress bar, loss.png). ``checkpoint_writer``
    (``qkv.checkpoint.save_checkpoint``'s signature) writes each checkpoint: by default the whole model; a LoRA
    recipe's writes its adapters alone."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, train_source: BatchSource, val_source: BatchSource,
                 config: TrainConfig, out_dir: str | Path, *, objective: Objective | None = None,
                 run_info: dict | None = None, print_fn: Callable[[str], None] | None = None,
                 callbacks: Sequence[Callback] | None = None, checkpoint_writer: Callable | None = None):
        self.config, self.tokenizer, self.out_dir = config, tokenizer, Path(out_dir)
        self.checkpoint_writer = checkpoint_writer  # what a checkpoint holds: the whole model, unless a recipe says
        self.rank, self.world = process_rank()
        self.device = resolve_device(config.device)  # "auto": CUDA when there is a GPU; a name torch lacks: one line
        if self.world > 1 and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # one GPU per process
        self.model = model.to(self.device).train()
        if config.activation_checkpointing:  # before any wrapper: the blocks themselves recompute
            checkpoint_activations(self.model)
        # What a training step calls: the model itself, or under torchrun its DistributedDataParallel wrapper,
        # which all-reduces (averages) the gradients across processes during the backward pass, or the model
        # with its parameters sharded across the processes (FSDP: gathered per block for forward and backward,
        # gradients reduce-scattered, each process updating its shard).
        self.sharded = self.world > 1 and config.parallel == "fsdp"
        self.replica: nn.Module = self.model if self.world == 1 else replicate(self.model, self.device,
                                                                                 config.parallel)
        self.objective = objective or OBJECTIVES[model.model_type](tokenizer, config)
        self.train_source, self.val_source = train_source, val_source
        self.val_batches = val_source.fixed(config.eval_batches)
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
        self.callbacks: list[Callback] = list(default_callbacks() if callbacks is None else callbacks)
        self.stop_signal: int | None = None  # set by StopOnSignal's handler, at any moment
        self._agreed_stop: int | None = None  # under torchrun: the stop signal every process has agreed on
        self._resumed_at = 0  # the step a resumed run started from (its first step is printed)
        self.loss_curve: Path | None = None  # set by the LossCurve callback at the end of a run

    # -- schedule -------------------------------------------------------------------------------------------------
    def progress(self) -> float:
        """How far along the schedule the run is, 0 → 1: by steps, by the clock, whichever is further, against the
        schedule's end (``horizon``: the max_steps and time_budget the run started with)."""
        max_steps, time_budget = self.horizon
        return max(self.step / max_steps if max_steps else 0.0,
                   self.elapsed / time_budget if time_budget else 0.0)

    def lr_at(self, step: int) -> float:
        """The learning rate of step ``step`` (counted from 0): see ``qkv.training.schedules.learning_rate``."""
        return learning_rate(self.config, step, self.progress(), d_model=self.model.config.d_model,
                             last_ratio=self.lr_ratio)

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
        batches = [self.train_source.batch(index) for index in indices]
        predicted = sum(self.objective.predicted(b, self._generator(i)) for i, b in zip(indices, batches, strict=True))
        n_tokens = sum(self.objective.tokens_in(b) for b in batches)
        if self.world > 1:
            predicted, n_tokens = (int(n) for n in all_reduce([float(predicted), float(n_tokens)], "sum"))
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
            total = all_reduce([total], "sum")[0]
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
        return fsdp_accumulating(self.model) if self.sharded else self.replica.no_sync()

    @property
    def objective_label(self) -> str:
        """What the training loss printed beside it is, when it is not plain cross-entropy: with label smoothing
        ε it is the smoothed objective, larger than the cross-entropy the validation loss and ``qkv eval`` give."""
        eps = self.config.label_smoothing
        return f" (label-smoothed {eps:g})" if eps else ""

    def validation_loss(self, final: bool = False) -> float:
        """The validation loss: mean cross-entropy per predicted token over the fixed evaluation batches, never
        label-smoothed (``qkv.training.mean_loss``: the figure ``qkv eval`` gives for the same batches)."""
        c = self.config
        batches = self.val_batches
        if final and c.final_eval_batches not in (None, c.eval_batches):
            batches = self.val_source.fixed(c.final_eval_batches)
        if not self.sharded:  # each process evaluates its share of the batches
            return mean_loss(self.model, self.objective, batches, seed=c.seed, bf16=self.bf16,
                             share=(self.rank, self.world))
        # Under FSDP every forward is a collective, so every process evaluates every batch.
        loss = mean_loss(self.model, self.objective, batches, seed=c.seed, bf16=self.bf16)
        self.model.reshard()  # a forward without backward leaves the root's parameters gathered: shard them again
        return loss

    evaluate = validation_loss  # the method's name before the function got its own (qkv.training.mean_loss)

    def _evaluation_due(self, clock_before_step: float) -> bool:
        c = self.config
        if self.step % c.eval_every == 0:
            return True
        return bool(c.eval_seconds) and int(self.elapsed // c.eval_seconds) > int(clock_before_step // c.eval_seconds)

    # -- the loop -------------------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train until ``max_steps`` or ``time_budget``; evaluate, log and save along the way."""
        c = self.config
        if self._resumed_at and self._done():  # a finished run: nothing to train, nothing to save again
            last = f" (validation loss {self.history[-1]['val_loss']:.4f})" if self.history else ""
            raise ValueError(f"the run already finished at step {self.step}{last}; to continue it, raise max_steps "
                             f"above {self.step} (qkv train --resume RUN --max-steps N) or its time_budget")
        if not self._resumed_at and c.schedule == "cosine" and c.max_steps is not None and \
                c.warmup_steps >= c.max_steps:
            self.print(f"note: warmup_steps={c.warmup_steps} >= max_steps={c.max_steps}: the learning rate never "
                       f"reaches lr={c.peak_lr:g}; pass a smaller warmup_steps (--warmup-steps) for a short run")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        save_every = c.eval_every if c.save_every is None else c.save_every
        val_loss = float("nan")
        window_loss, window_steps = 0.0, 0
        with self._running_callbacks():
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
                    self.print(f"step {self.step}: loss {loss:.4f}{self.objective_label}, {spent:.2f} s")
                done = self._done()
                evaluating = done or self._evaluation_due(clock_before_step)
                if self.step % c.log_every == 0 or evaluating:
                    row = {"step": self.step, "elapsed_s": round(self.elapsed, 3), "tokens": self.tokens,
                           "lr": self.optimizer.param_groups[0]["lr"], "train_loss": window_loss / window_steps,
                           "tokens_per_s": round(self.tokens_per_s), "label_smoothing": c.label_smoothing}
                    window_loss, window_steps = 0.0, 0
                    if evaluating:
                        start, at = time.perf_counter(), self.elapsed
                        val_loss = self.validation_loss(final=done)
                        if not done:  # evaluations during training count on the clock; the final one does not
                            self.elapsed += time.perf_counter() - start
                            self._agree()
                        row.update(val_loss=val_loss, val_ppl=perplexity(val_loss))
                        self.history.append({"step": self.step, "elapsed_s": at, "val_loss": val_loss})
                        self._say(f"step {self.step:>6} | {self.elapsed:7.1f} s | train {row['train_loss']:.4f}"
                                  f"{self.objective_label} | val {val_loss:.4f} (ppl {perplexity_text(val_loss)}) | "
                                  f"{self.tokens_per_s:,.0f} tok/s")
                    for callback in self.callbacks:
                        callback.log(self, row)
                stop = self.stop_signal if self.world == 1 else self._agreed_stop
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
                val_loss = self.validation_loss(final=True)
                self.history.append({"step": self.step, "elapsed_s": self.elapsed, "val_loss": val_loss})
            checkpoint = self.save()
        for callback in self.callbacks:
            callback.end(self)
        return TrainResult(self.step, self.elapsed, val_loss, self.tokens_per_s, checkpoint, self.history,
                           self.loss_curve)

    @contextlib.contextmanager
    def _running_callbacks(self):
        """Each callback's ``start`` in order; their ``finish`` in reverse order however the loop ends."""
        with contextlib.ExitStack() as stack:
            for callback in self.callbacks:
                callback.start(self)
                stack.callback(callback.finish, self)
            yield

    def _say(self, message: str) -> None:
        """A message for the user: through the first callback that shows it (a progress bar), else printed."""
        if not any(callback.write(message) for callback in self.callbacks):
            self.print(message)

    def _agree(self) -> None:
        """Under torchrun, every process takes the slowest clock and any stop signal, so all of them stop,
        evaluate and save at the same step."""
        if self.world > 1:  # a signal arriving after this call waits for the next one (then all see it)
            stop = -1.0 if self.stop_signal is None else float(self.stop_signal)
            self.elapsed, stop = all_reduce([self.elapsed, stop], "max")
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
        rng = {"torch": torch.get_rng_state(), "numpy": numpy_state(), "python": list(random.getstate())}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        if self.world > 1:  # each process draws its own dropout masks: keep every process's generators
            rng = {**rng, "processes": gather_objects(rng, self.world)}
        return {"step": self.step, "elapsed": self.elapsed, "train_time": self.train_time, "tokens": self.tokens,
                "data_position": self.step * self.config.grad_accum * self.world, "world_size": self.world,
                "optimizer": full_optimizer_state(self.model, self.optimizer) if self.sharded
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
            self.optimizer.load_state_dict(upgrade_saved_state(self.model, state["optimizer"]))
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
        np.random.set_state(numpy_state(rng["numpy"]))
        version, internal, gauss = rng["python"]
        random.setstate((version, tuple(internal), gauss))

    def save(self) -> Path:
        state = self.state_dict()  # under torchrun every process takes part (its random state is gathered)
        weights = full_model_state(self.model) if self.sharded else None  # the shards, gathered on process 0
        if self.rank == 0:
            self.last_checkpoint = save_run_checkpoint(self.out_dir, self.step, self.model, self.tokenizer,
                                                       trainer_state=state, keep=self.config.keep_checkpoints,
                                                       weights=weights, writer=self.checkpoint_writer)
        if self.world > 1:  # the others learn where it went once it is complete
            self.last_checkpoint = broadcast_object(self.last_checkpoint)
        return self.last_checkpoint


def numpy_state(saved: list | None = None):
    """numpy's global RNG state ↔ a JSON-friendly list."""
    if saved is None:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        return [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]
    name, keys, pos, has_gauss, gauss = saved
    return name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss
