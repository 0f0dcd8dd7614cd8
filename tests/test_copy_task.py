"""The encoder-decoder Transformer learns to copy: the end-to-end proof that every part works together."""

from __future__ import annotations

import pytest
import torch

from qkv import ModelConfig, Transformer
from qkv.losses import cross_entropy
from qkv.tasks import BOS, EOS, FIRST_SYMBOL, copy_task

LENGTH, VOCAB = 8, 12  # 9 symbols after <pad>, <bos>, <eos>


def test_copy_task_layout() -> None:
    src, tgt = copy_task(5, LENGTH, VOCAB, generator=torch.Generator().manual_seed(0))
    assert src.shape == (5, LENGTH) and tgt.shape == (5, LENGTH + 2)
    assert src.min() >= FIRST_SYMBOL and src.max() < VOCAB
    assert (tgt[:, 0] == BOS).all() and (tgt[:, -1] == EOS).all()
    assert torch.equal(tgt[:, 1:-1], src)
    with pytest.raises(ValueError, match="vocab_size=3"):
        copy_task(1, 4, 3)


@torch.no_grad()
def greedy_decode(model: Transformer, src: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """y_t = argmax_y P(y | y_<t, x), starting from <bos>; returns the n_tokens produced after <bos>."""
    memory = model.encode(src)
    out = torch.full((src.shape[0], 1), BOS)
    for _ in range(n_tokens):
        next_token = model.decode(out, memory)[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, next_token], dim=1)
    return out[:, 1:]




def test_transformer_learns_to_copy_held_out_sequences(one_thread) -> None:
    torch.manual_seed(0)
    # tiny-seq2seq with the paper's embedding scaling; init_std ~ 1/sqrt(d_model) (Xavier-sized for this width)
    # skips the long plateau that GPT-2's 0.02 causes in so small a model.
    config = ModelConfig.preset("tiny-seq2seq", vocab_size=VOCAB, d_ff=128, max_seq_len=16,
                                scale_embeddings=True, init_std=0.125)
    model = Transformer(config)
    held_out_src, held_out_tgt = copy_task(500, LENGTH, VOCAB, generator=torch.Generator().manual_seed(123))
    n_symbols = VOCAB - FIRST_SYMBOL

    model.eval()
    before = (greedy_decode(model, held_out_src, LENGTH + 1) == held_out_tgt[:, 1:]).float().mean().item()
    assert before < 2 / n_symbols  # untrained: about chance, so what follows is learned

    steps, lr = 250, 3e-3
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    gen = torch.Generator().manual_seed(1)
    as_number = VOCAB ** torch.arange(LENGTH)  # a sequence as one integer, to check the held-out set
    seen: set[int] = set()
    model.train()
    for _ in range(steps):
        src, tgt = copy_task(64, LENGTH, VOCAB, generator=gen)  # fresh random sequences every step
        seen.update((src * as_number).sum(-1).tolist())
        loss = cross_entropy(model(src, tgt[:, :-1]), tgt[:, 1:])  # teacher forcing
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    # Guessing the symbols uniformly would cost ln(n_symbols) nats per token; a copier pays almost nothing.
    assert loss.item() < 0.05 * torch.log(torch.tensor(float(n_symbols))).item()

    model.eval()
    assert seen.isdisjoint((held_out_src * as_number).sum(-1).tolist())  # truly held out
    produced = greedy_decode(model, held_out_src, LENGTH + 1)  # the symbols, then <eos>
    token_accuracy = (produced == held_out_tgt[:, 1:]).float().mean().item()
    assert token_accuracy >= 0.99, token_accuracy
