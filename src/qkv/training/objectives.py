"""Objectives: how a batch becomes a loss, one per model shape, in one registry.

- ``NextToken`` (``DecoderLM``): L = -mean_t log P(x_{t+1} | x_≤t).
- ``MaskedLM`` (``Encoder``): BERT's recipe, loss on the 15% chosen tokens only.
- ``Seq2SeqObjective`` (``Transformer``): L = -mean_t log P(y_t | y_<t, x), teacher-forced.

A batch source is anything with ``batch(index)`` (training batch number ``index``, a pure function of the index)
and ``fixed(n_batches)`` (the evaluation batches); the objective turns what the source yields into a loss.
``mean_loss`` is the validation loss: plain cross-entropy per predicted token over a list of batches, never
label-smoothed, the one figure the trainer's validation, metrics.csv and ``qkv eval`` all report. Label smoothing
belongs to the training objective alone (``loss(..., smoothed=True)``, the default while training).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..data.parallel import Seq2SeqBatch
from ..losses import IGNORE_INDEX, cross_entropy
from ..models import evaluating
from ..tokenizers import Tokenizer
from .distributed import all_reduce
from .options import TrainConfig

__all__ = ["MASK_TOKEN", "BatchSource", "Objective", "NextToken", "MaskedLM", "Seq2SeqObjective", "OBJECTIVES",
           "mean_loss"]

MASK_TOKEN = "<mask>"


class BatchSource(Protocol):
    def batch(self, index: int) -> Any: ...
    def fixed(self, n_batches: int) -> list[Any]: ...


class Objective:
    """How a batch becomes a loss. ``window_extra``: tokens a text window needs beyond the model's context."""

    window_extra = 0

    def __init__(self, tokenizer: Tokenizer, config: TrainConfig):
        self.tokenizer, self.config = tokenizer, config

    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator, *, reduction: str = "mean",
             smoothed: bool = True) -> tuple[Tensor, int]:
        """→ (the loss over the predicted tokens, their mean or with ``reduction="sum"`` their sum; how many).

        ``smoothed``: the training objective, label-smoothed by ``config.label_smoothing``; ``False``: plain
        cross-entropy, the validation loss (see ``mean_loss``)."""
        raise NotImplementedError

    def label_smoothing(self, smoothed: bool) -> float:
        """ε of the loss: the training options' when ``smoothed``, else 0 (plain cross-entropy)."""
        return self.config.label_smoothing if smoothed else 0.0

    def predicted(self, batch: Any, generator: torch.Generator) -> int:
        """How many tokens ``loss(model, batch, generator)`` predicts, known before the forward pass (gradient
        accumulation divides every micro-batch's summed loss by the count of the whole optimizer step)."""
        raise NotImplementedError

    def tokens_in(self, batch: Any) -> int:
        """How many tokens the model reads for this batch (for tokens/s)."""
        return batch.shape[0] * (batch.shape[1] - self.window_extra)


class NextToken(Objective):
    """L = -mean_t log P(x_{t+1} | x_≤t): a window of T+1 tokens gives T inputs and their T successors.

    A batch that names its targets (``inputs``, ``attention_mask``, ``labels``: chat fine-tuning's
    ``qkv.data.ChatBatch``) is scored on them alone: L = -Σ_{t: labels_t ≠ ignore} log P(labels_t | x_≤t) / their
    count, so only the assistant replies teach; a batch with no target has loss 0 and no gradient, never 0/0."""

    window_extra = 1

    def loss(self, model, batch: Tensor, generator, *, reduction: str = "mean", smoothed: bool = True):
        eps = self.label_smoothing(smoothed)
        if hasattr(batch, "labels"):  # the batch says which tokens are targets (padding and prompts are not)
            count = self.predicted(batch, generator)  # counted on the CPU: no wait for the device
            batch = batch.to(self.device(model))
            logits = model(batch.inputs, batch.attention_mask)
            summed = cross_entropy(logits, batch.labels, label_smoothing=eps, reduction="sum")
            return (summed if reduction == "sum" else summed / max(count, 1)), count
        ids = batch.to(self.device(model), non_blocking=True)
        logits = model(ids[:, :-1])  # (batch, T, vocab)
        return (cross_entropy(logits, ids[:, 1:], label_smoothing=eps, reduction=reduction),
                self.predicted(batch, generator))

    def predicted(self, batch: Tensor, generator) -> int:
        if hasattr(batch, "labels"):
            return int((batch.labels != IGNORE_INDEX).sum())
        return self.tokens_in(batch)  # every input token predicts its successor

    def tokens_in(self, batch) -> int:
        if hasattr(batch, "attention_mask"):
            return int(batch.attention_mask.sum())  # real tokens, padding left out
        return super().tokens_in(batch)

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

    def loss(self, model, batch: Tensor, generator, *, reduction: str = "mean", smoothed: bool = True):
        inputs, targets = self.corrupt(batch, generator)
        count = int((targets != IGNORE_INDEX).sum())  # counted on the CPU: no wait for the device
        device = NextToken.device(model)
        hidden = model(inputs.to(device))  # (batch, T, d_model)
        logits = getattr(model, "module", model).logits(hidden)  # the model itself under DistributedDataParallel
        return cross_entropy(logits, targets.to(device), label_smoothing=self.label_smoothing(smoothed),
                             reduction=reduction), count


class Seq2SeqObjective(Objective):
    """L = -mean_t log P(y_t | y_<t, x): teacher forcing, label smoothing from the training options."""

    def loss(self, model: nn.Module, batch: Seq2SeqBatch, generator: torch.Generator, *, reduction: str = "mean",
             smoothed: bool = True) -> tuple[Tensor, int]:
        count = self.predicted(batch, generator)  # counted on the CPU: no wait for the device
        batch = batch.to(next(model.parameters()).device)
        logits = model(batch.src, batch.tgt_in, batch.src_mask, batch.tgt_mask)  # (batch, tgt_len, vocab)
        return (cross_entropy(logits, batch.tgt_out, label_smoothing=self.label_smoothing(smoothed),
                              reduction=reduction), count)

    def predicted(self, batch: Seq2SeqBatch, generator: torch.Generator) -> int:
        """The real target tokens (``tgt_out`` is IGNORE_INDEX at padding)."""
        return int(batch.tgt_mask.sum())

    def tokens_in(self, batch: Seq2SeqBatch) -> int:
        """Real (unpadded) source plus target tokens."""
        return int(batch.src_mask.sum()) + int(batch.tgt_mask.sum())


# model_type → its objective: the one registry, written out (``Trainer`` takes the model's by default)
OBJECTIVES: dict[str, Callable[[Tokenizer, TrainConfig], Objective]] = {
    "decoder": NextToken,
    "encoder": MaskedLM,
    "seq2seq": Seq2SeqObjective,
}


@torch.no_grad()
def mean_loss(model: nn.Module, objective: Objective, batches: list, *, seed: int = 0, bf16: bool = False,
             share: tuple[int, int] = (0, 1)) -> float:
    """The validation loss: mean cross-entropy per predicted token over ``batches``, without label smoothing
    whatever the objective trains with (model in eval mode; its mode is restored after).

    ``share=(r, N)``: under torchrun, process r of N evaluates batches r, r + N, ... and the sums are added up
    across the processes, so the mean is the one a single process computes."""
    total, count = 0.0, 0
    device_type = NextToken.device(model).type
    rank, world = share
    with evaluating(model):
        for i in range(rank, len(batches), world):
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
                loss, n = objective.loss(model, batches[i], torch.Generator().manual_seed(seed + i), smoothed=False)
            total += float(loss) * n
            count += n
    if world > 1:
        total, count = all_reduce([total, float(count)], "sum")
    return total / max(count, 1)


