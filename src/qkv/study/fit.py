"""The data and the short training loop the studies share.

Why not :class:`qkv.training.Trainer`: a study trains five to ten small models in one process and keeps only its
tables and plots. The trainer is built for the one run that matters: it saves a checkpoint, a metrics CSV and a
loss plot per run, installs signal handlers, draws its own progress bar, and stops at the first non-finite loss
by raising. The studies want none of those side effects, one progress bar across all their runs, and the loss
of every step (the scale study records *where* a run goes wrong). So :func:`fit` is the trainer's step and
nothing else, built from the trainer's own public parts: its objectives (:class:`~qkv.training.NextToken`,
:class:`~qkv.training.MaskedLM`), :func:`~qkv.training.param_groups`, :func:`~qkv.training.adamw_kernel` and the
:func:`~qkv.training.warmup_cosine` schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from ..data import TokenSplits, load_tokens, read_corpus
from ..tokenizers import Tokenizer
from ..training import BatchSource, Objective, adamw_kernel, param_groups, warmup_cosine

__all__ = ["SmallModel", "fit", "shakespeare", "tail_mean"]


@dataclass(frozen=True)
class SmallModel:
    """The shape of the small models a study trains: pre-LN, no dropout, and token embeddings scaled by
    sqrt(d_model) as in the paper, so they start at unit size like the sinusoidal table they are added to
    (unscaled at init_std 0.02 the table drowns them: a sinusoidal model then lags every other encoding)."""

    context: int  # tokens per training window: the model's max_seq_len
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 256

    def config(self, positional: str, vocab_size: int, *, encoder: bool = False) -> ModelConfig:
        return ModelConfig(vocab_size=vocab_size, d_model=self.d_model, n_heads=self.n_heads, d_ff=self.d_ff,
                           n_encoder_layers=self.n_layers if encoder else 0,
                           n_decoder_layers=0 if encoder else self.n_layers, max_seq_len=self.context,
                           positional=positional, norm_position="pre", dropout=0.0, scale_embeddings=True)

    def describe(self) -> str:
        return (f"{self.n_layers} layers, d_model {self.d_model}, {self.n_heads} heads, d_ff {self.d_ff}, "
                f"context {self.context}")


def shakespeare() -> tuple[Tokenizer, TokenSplits]:
    """The bundled tiny Shakespeare as characters: (tokenizer, first 90% train / last 10% validation tokens)."""
    corpus = read_corpus(None)
    tokenizer = Tokenizer.char(corpus.text)
    return tokenizer, load_tokens(corpus, tokenizer)


def fit(model: nn.Module, objective: Objective, data: BatchSource, *, steps: int, lr: float, warmup: int,
        seed: int, bf16: bool = False, weight_decay: float = 0.1, grad_clip: float | None = 1.0,
        on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train ``model`` in place for ``steps`` AdamW steps on ``data.batch(0), data.batch(1), ...``.

    The learning rate warms up linearly over ``warmup`` steps, then decays on a cosine to lr/10 (the trainer's
    schedule); ``bf16`` trains under bfloat16 autocast. → the training loss of every step taken. A non-finite
    loss or gradient norm ends the run at that step, without applying it: a list shorter than ``steps`` says
    the run diverged at step ``len(losses)`` (its last entry is that step's loss).
    """
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.99),
                                  **adamw_kernel(device))
    model.train()
    losses: list[float] = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * warmup_cosine(step, step / steps, warmup=warmup, min_ratio=0.1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = objective.loss(model, data.batch(step), torch.Generator().manual_seed(seed * 1_000_003 + step))
        loss.backward()
        norm = float(nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf))
        value = float(loss.detach())
        finite = math.isfinite(value) and math.isfinite(norm)
        if finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(value)
        if on_step is not None:
            on_step(step, losses[-1])
        if not finite:
            break
    model.eval()
    return losses


def tail_mean(losses: list[float]) -> float:
    """The mean training loss over the last 10% of steps (at least one): a run's final loss, less noisy."""
    tail = losses[-max(1, len(losses) // 10):]
    return sum(tail) / len(tail)
