"""From the model's logits to the distribution a token is drawn from: the repetition penalty, temperature,
top-k and top-p, each a formula on a (batch, vocab) tensor, checked on the distribution in the tests.

Applied in this order, as Hugging Face does: repetition penalty (and, before ``min_new_tokens``, the stop tokens
forbidden) → / temperature → top-k → top-p → softmax.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import GenerationConfig

__all__ = ["apply_repetition_penalty", "filter_top_k", "filter_top_p", "next_token_probs", "process",
           "choose", "choose_checked", "seen_tokens", "check_finite", "read_checked"]


def check_finite(logits: Tensor) -> Tensor:
    """The model's next-token logits, refused when any is NaN or infinite (softmax and sampling would fail on them,
    or greedy decoding would pick an arbitrary token)."""
    # One reduction: the sum is NaN or infinite exactly when some logit is (float32 cannot overflow on logits
    # of any real model); 3.6 us a step where torch.isfinite(...).all() took 17 (a (1, 65) row on this CPU).
    if not math.isfinite(logits.sum(dtype=torch.float32).item()):
        rows = (~torch.isfinite(logits)).any(-1).nonzero().flatten().tolist()
        raise ValueError(f"the model's next-token logits hold NaN or infinity (rows {rows[:5]}): its weights or "
                         "activations are not finite; check the weights with torch.isfinite, or run in float32 "
                         "if a bfloat16/float16 model overflows")
    return logits


def read_checked(tokens: Tensor, logits: Tensor) -> list[int]:
    """A decoding step's one read from the tensors: ``tokens`` (batch,) as host ints, with :func:`check_finite`'s
    test of the ``logits`` they were chosen from folded into the same read (its error when one is not finite)."""
    bad = ~torch.isfinite(logits.sum(dtype=torch.float32))  # NaN or infinite exactly when some logit is
    host = torch.cat([tokens, bad.long().view(1)]).tolist()
    if host[-1]:
        check_finite(logits)  # raises, naming the rows
    return host[:-1]


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """l_i ← l_i / p if l_i > 0 else l_i · p, for every token i already seen (CTRL, Keskar et al. 2019)."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep exactly the k largest logits of each row; the rest become -inf.

    Ties at the k-th value are broken by index, the lower index kept (as ``argmax`` picks the first maximum):
    every logit above the k-th largest value stays, then the lowest-indexed logits equal to it fill the k.
    """
    if k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]  # (batch, 1): the k-th largest value
    above = logits > kth
    tied = logits == kth
    room = k - above.sum(-1, keepdim=True)  # how many of the tied logits fit
    keep = above | (tied & (tied.cumsum(-1) <= room))
    return logits.masked_fill(~keep, float("-inf"))


def filter_top_p(logits: Tensor, p: float) -> Tensor:
    """Keep the nucleus: the fewest most-likely tokens whose total probability reaches p; the rest → -inf."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # probability of the tokens strictly more likely than this one
    drop_sorted = mass_before >= p  # the most likely token is always kept (mass_before = 0 < p)
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token_probs(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                     top_p: float = 1.0) -> Tensor:
    """P(next = i) = softmax(filter(logits / temperature))_i, filtered by top-k then top-p; (batch, vocab).

    The distribution :func:`~qkv.generation.generate` samples from; temperature 0 puts all mass on the argmax.
    """
    if temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / temperature
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    logits = filter_top_p(logits, top_p)
    return logits.softmax(-1)


def choose(logits: Tensor, cfg: GenerationConfig, generator: torch.Generator | None = None) -> Tensor:
    """(batch,) next tokens from processed logits: the argmax at temperature 0 (exactly greedy), else one draw
    from :func:`next_token_probs` with ``generator`` (None: torch's global one)."""
    if cfg.greedy:
        return logits.argmax(-1)
    if cfg.top_k is not None or cfg.top_p < 1.0:
        probs = next_token_probs(logits, cfg.temperature, cfg.top_k, cfg.top_p)
    else:  # no filter: skip the sort
        probs = (logits / cfg.temperature).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def seen_tokens(ids: Tensor, mask: Tensor | None, vocab_size: int) -> Tensor:
    """(batch, vocab) bool: which tokens each row of ``ids`` holds, padding (mask False) excluded; what the
    repetition penalty discourages."""
    seen = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.bool, device=ids.device)
    seen.scatter_(1, (ids if mask is None else ids.masked_fill(~mask, vocab_size)).long(), True)
    return seen[:, :vocab_size]  # padding landed in the extra column


def process(logits: Tensor, step: int, cfg: GenerationConfig, seen: Tensor | None, stop_ids: Tensor | None
            ) -> Tensor:
    """The logits after the repetition penalty (``seen``: None when it is off) and, before ``min_new_tokens``
    new tokens, with the stop tokens forbidden (-inf)."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if stop_ids is not None and step < cfg.min_new_tokens:
        logits = logits.index_fill(-1, stop_ids, float("-inf"))
    return logits


def choose_checked(logits: Tensor, step: int, cfg: GenerationConfig, seen: Tensor | None, stop_ids: Tensor | None,
                    generator: torch.Generator | None) -> Tensor:
    """``choose(process(logits))``; a draw from NaN or infinite logits (torch.multinomial refuses them) is the
    one clear error of :func:`check_finite` instead."""
    try:
        return choose(process(logits, step, cfg, seen, stop_ids), cfg, generator)
    except RuntimeError:
        check_finite(logits)
        raise
