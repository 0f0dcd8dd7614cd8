"""The training objective: cross-entropy of the next token under the model's softmax."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

__all__ = ["IGNORE_INDEX", "cross_entropy", "PERPLEXITY_LIMIT", "perplexity", "perplexity_text"]

IGNORE_INDEX = -100  # targets with this value (padding, unmasked MLM positions) do not count
PERPLEXITY_LIMIT = 50.0  # nats: past e^50 (5e21) a perplexity is a 22-digit number that says less than the loss


def cross_entropy(logits: Tensor, targets: Tensor, *, label_smoothing: float = 0.0,
                  reduction: str = "mean") -> Tensor:
    """L = -mean_t log softmax(logits_t)[target_t], over targets != IGNORE_INDEX (``reduction="sum"``: the sum).

    logits (batch, seq, vocab), targets (batch, seq). With label smoothing ε the target distribution is
    (1 - ε) on the true token and ε spread uniformly over the vocabulary (the paper uses ε = 0.1). The sum is what
    gradient accumulation adds up: divided by the number of targets of the whole optimizer step, it weighs every
    target alike however the step's batches were cut.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r} is not one of mean, sum")
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree; "
                         "expected logits (batch, seq, vocab) and targets (batch, seq)")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing, reduction=reduction)


def perplexity(loss: float) -> float:
    """exp(loss), the perplexity of a mean cross-entropy in nats; ``inf`` past e^PERPLEXITY_LIMIT (where it
    would be a meaningless 22-digit number, and past e^709 an OverflowError)."""
    return math.inf if loss > PERPLEXITY_LIMIT else math.exp(loss)


def perplexity_text(loss: float) -> str:
    """exp(loss) as printed beside a loss: ``327.14``; ``overflow (loss > 50)`` past e^50, where the number would
    only be a long row of digits (the loss says it); ``nan`` for a NaN loss."""
    if math.isnan(loss):
        return "nan"
    if loss > PERPLEXITY_LIMIT:
        return f"overflow (loss > {PERPLEXITY_LIMIT:g})"
    return f"{math.exp(loss):.2f}"
