"""The training objective: cross-entropy of the next token under the model's softmax."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["IGNORE_INDEX", "cross_entropy"]

IGNORE_INDEX = -100  # targets with this value (padding, unmasked MLM positions) do not count


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
