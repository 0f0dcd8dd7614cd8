"""Writing text one token at a time: x_{t+1} ~ softmax(logits_t / temperature), with a key/value cache.

(Foundation version: greedy, temperature and top-k. The generation issue extends this module.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .models import DecoderLM

__all__ = ["generate"]


@torch.no_grad()
def generate(model: DecoderLM, ids: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, seed: int | None = None) -> Tensor:
    """ids (batch, prompt) → (batch, prompt + max_new_tokens). temperature 0 = greedy (argmax)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1")
    generator = None if seed is None else torch.Generator(ids.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    cache = model.new_cache(ids.shape[1] + max_new_tokens)
    logits = model(ids, cache=cache)[:, -1]
    out = [ids]
    for step in range(max_new_tokens):
        if temperature == 0:
            next_id = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        out.append(next_id)
        if step + 1 < max_new_tokens:
            logits = model(next_id, cache=cache)[:, -1]
    model.train(was_training)
    return torch.cat(out, dim=1)
