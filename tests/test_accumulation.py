"""Gradient accumulation weighs every predicted token alike, for every objective.

A optimizer step over micro-batches holding different numbers of predicted tokens (masked LM: the random 15%;
seq2seq: batches cut by a token budget) must give the gradient and the loss of one batch holding all of them: the
mean over every predicted token, not the mean of the micro-batches' means. The reference is computed here, apart
from the trainer: one forward pass over the micro-batches joined into one batch, ``F.cross_entropy`` averaged over
all their targets, one backward pass. (The two-process version is in test_distributed.py.)
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from qkv import ModelConfig
from qkv.data import read_corpus
from qkv.models import DecoderLM, Encoder, Transformer
from qkv.tokenizers import Tokenizer
from qkv.train import IGNORE_INDEX, TrainConfig, Trainer
from qkv.translation import Seq2SeqBatch, TokenBatches

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = read_corpus().text[:20_000]
# fp32 sums over a few hundred tokens in two orders: relative differences of ~1e-7; a mean of means is off by ~1e-1
TOLERANCE = 1e-5


class ListSource:
    """Batch ``i`` is ``batches[i % len(batches)]`` (any object with batch(i) and fixed(n) plugs into the trainer)."""

    def __init__(self, batches):
        self.batches = batches

    def batch(self, index):
        return self.batches[index % len(self.batches)]

    def fixed(self, n_batches):
        return self.batches[:n_batches]


def flat_gradient(model: torch.nn.Module) -> Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in model.parameters()])


def accumulated_step(model: torch.nn.Module, tok: Tokenizer, micro_batches: list, tmp_path, *,
                     grad_clip: float | None = None) -> tuple[float, float, Tensor, Trainer]:
    """One trainer step over ``micro_batches`` (grad_accum = their number) → (the loss it logs, the gradient norm
    before clipping, the gradient the optimizer applied, the trainer)."""
    config = TrainConfig(max_steps=1, grad_accum=len(micro_batches), warmup_steps=0, grad_clip=grad_clip,
                         progress=False, eval_batches=1, device="cpu")  # fp32, as the reference
    trainer = Trainer(model, tok, ListSource(micro_batches), ListSource(micro_batches), config,
                      tmp_path / f"run{len(micro_batches)}", print_fn=lambda _: None)
    applied = []
    trainer.optimizer.register_step_pre_hook(lambda *_: applied.append(flat_gradient(model)))
    loss, norm, _ = trainer.train_step()
    return loss, norm, applied[0], trainer


def relative_difference(got: Tensor, expected: Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


def one_batch_gradient(model: torch.nn.Module, logits_of, targets: Tensor) -> tuple[float, Tensor]:
    """The mean cross-entropy over every target != IGNORE_INDEX of one batch, and its gradient."""
    logits = logits_of(model)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    loss.backward()
    return float(loss.detach()), flat_gradient(model)


def text_windows(tok: Tokenizer, n: int, length: int, start: int = 0) -> Tensor:
    ids = tok.encode(TEXT)
    return torch.tensor([ids[start + i * 97:start + i * 97 + length] for i in range(n)])  # (n, length)


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(**{"d_model": 32, "n_heads": 2, "d_ff": 64, "max_seq_len": 32, "dropout": 0.0, **overrides})


def test_masked_lm_micro_batches_weigh_by_their_masked_tokens(tmp_path):
    tok = Tokenizer.char(TEXT, special_tokens=["<mask>"])
    torch.manual_seed(0)
    model = Encoder(tiny(vocab_size=tok.vocab_size, n_encoder_layers=2, n_decoder_layers=0))
    reference = copy.deepcopy(model)
    micro = [text_windows(tok, 3, 32), text_windows(tok, 3, 32, start=5000)]
    loss, _, gradient, trainer = accumulated_step(model, tok, micro, tmp_path)
    # the tokens the trainer masked: micro-batch i is corrupted with the random numbers of data position i
    corrupted = [trainer.objective.corrupt(b, trainer._generator(i)) for i, b in enumerate(micro)]
    counts = [int((targets != IGNORE_INDEX).sum()) for _, targets in corrupted]
    assert abs(counts[0] - counts[1]) >= 4, counts  # unequal counts: a mean of means would be visibly off
    inputs, targets = (torch.cat(parts) for parts in zip(*corrupted, strict=True))
    expected_loss, expected = one_batch_gradient(reference, lambda m: m.logits(m(inputs)), targets)
    assert relative_difference(gradient, expected) < TOLERANCE
    assert loss == pytest.approx(expected_loss, rel=1e-6)


def right_padded_together(batches: list[Seq2SeqBatch]) -> Seq2SeqBatch:
    """Seq2seq batches of different widths stacked into one, each padded on the right to the widest."""
    def stack(field: int, fill) -> Tensor:
        width = max(b[field].shape[1] for b in batches)
        return torch.cat([F.pad(b[field], (0, width - b[field].shape[1]), value=fill) for b in batches])

    return Seq2SeqBatch(stack(0, 0), stack(1, False), stack(2, 0), stack(3, False), stack(4, IGNORE_INDEX))


def test_seq2seq_token_budget_batches_weigh_by_their_target_tokens(tmp_path):
    tok = Tokenizer.char(TEXT, special_tokens=["<pad>", "<bos>", "<eos>"])
    lines = [line for line in TEXT.splitlines() if 4 <= len(line) <= 30]
    pairs = [(tok.encode(a) + [2], tok.encode(b) + [2]) for a, b in zip(lines[::2], lines[1::2], strict=False)]
    budget = TokenBatches([s for s, _ in pairs], [t for _, t in pairs], 160, seed=3)
    micro = [budget.batch(0), budget.batch(1)]
    counts = [int(b.tgt_mask.sum()) for b in micro]
    assert abs(counts[0] - counts[1]) >= 10, counts  # the budget cuts batches of unequal target tokens
    torch.manual_seed(0)
    model = Transformer(tiny(vocab_size=tok.vocab_size, n_encoder_layers=1, n_decoder_layers=1))
    reference = copy.deepcopy(model)
    loss, _, gradient, _ = accumulated_step(model, tok, micro, tmp_path)
    whole = right_padded_together(micro)
    expected_loss, expected = one_batch_gradient(
        reference, lambda m: m(whole.src, whole.tgt_in, whole.src_mask, whole.tgt_mask), whole.tgt_out)
    assert relative_difference(gradient, expected) < TOLERANCE
    assert loss == pytest.approx(expected_loss, rel=1e-6)


def test_next_token_micro_batches_give_the_one_batch_gradient(tmp_path):
    tok = Tokenizer.char(TEXT)
    torch.manual_seed(0)
    model = DecoderLM(tiny(vocab_size=tok.vocab_size, n_encoder_layers=0, n_decoder_layers=2))
    reference = copy.deepcopy(model)
    micro = [text_windows(tok, 4, 17), text_windows(tok, 2, 17, start=3000)]  # 64 and 32 predicted tokens
    loss, _, gradient, _ = accumulated_step(model, tok, micro, tmp_path)
    whole = torch.cat(micro)
    expected_loss, expected = one_batch_gradient(reference, lambda m: m(whole[:, :-1]), whole[:, 1:])
    assert relative_difference(gradient, expected) < TOLERANCE
    assert loss == pytest.approx(expected_loss, rel=1e-6)


def test_two_accumulated_half_batches_make_the_same_clipped_step_as_one_whole_batch(tmp_path):
    """The trainer against itself, clipping on: the same loss, gradient norm (taken before clipping) and applied
    gradient. (Not the weights to 1e-6: AdamW's first step moves a weight by lr·g/(|g| + eps), so a gradient element
    near eps = 1e-8 turns summation-order round-off, ~1e-10 in a gradient of norm 2, into differences of ~1e-5·lr.)"""
    tok = Tokenizer.char(TEXT)
    whole = text_windows(tok, 8, 17)
    steps = []
    for micro in ([whole], [whole[:4], whole[4:]]):
        torch.manual_seed(0)
        model = DecoderLM(tiny(vocab_size=tok.vocab_size, n_encoder_layers=0, n_decoder_layers=1))
        steps.append(accumulated_step(model, tok, micro, tmp_path, grad_clip=1.0)[:3])
    (loss_1, norm_1, gradient_1), (loss_2, norm_2, gradient_2) = steps
    assert norm_1 > 1.0  # clipped: the applied gradient is the clipped one
    assert (loss_2, norm_2) == pytest.approx((loss_1, norm_1), rel=1e-5)
    assert relative_difference(gradient_2, gradient_1) < TOLERANCE
