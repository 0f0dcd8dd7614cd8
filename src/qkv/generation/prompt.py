"""The checked inputs of one call (:func:`prepare`, run once per call) and the model fed one token at a time
(:class:`Stepper`)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..attention import check_mask, padding_mask
from ..models import DecoderLM, Transformer
from ..tokenizers import SEAM_CONTEXT
from .config import GenerationConfig
from .logits import check_finite, seen_tokens
from .stopping import stop_token_ids

__all__ = ["Prompt", "prepare", "check_fits", "Stepper"]


class Prompt(NamedTuple):
    """The checked inputs of one call."""

    ids: Tensor  # (batch, prompt) for a DecoderLM, left-padded; (batch, source) for a Transformer
    mask: Tensor | None  # True at real tokens; None when every token is real
    stop: tuple[int, ...]  # stop token ids
    pad: int  # fills rows that stopped
    start: Tensor  # what the output starts with: the prompt, or the target's start token (batch, 1)

    @property
    def seq2seq(self) -> bool:
        return self.start is not self.ids

    @property
    def target_start(self) -> Tensor | None:
        """The encoder-decoder's first decoder input (its start tokens); None for a decoder-only prompt."""
        return self.start if self.seq2seq else None

    def tails(self) -> list[list[int]]:
        """Each row's last real prompt tokens, the context its text is decoded after (a target has none)."""
        if self.seq2seq:
            return [[] for _ in range(self.ids.shape[0])]
        ids = self.ids[:, -SEAM_CONTEXT:]
        if self.mask is None:
            return ids.tolist()
        return [[t for t, real in zip(row, keep, strict=True) if real]
                for row, keep in zip(ids.tolist(), self.mask[:, -SEAM_CONTEXT:].tolist(), strict=True)]

    def seen_tokens(self, vocab_size: int) -> Tensor:
        """(batch, vocab) bool: the tokens each row's prompt holds (a source sentence does not count)."""
        if self.seq2seq:
            return torch.zeros(self.ids.shape[0], vocab_size, dtype=torch.bool, device=self.ids.device)
        return seen_tokens(self.ids, self.mask, vocab_size)


def prepare(model: Any, ids: Tensor, mask: Tensor | None, cfg: GenerationConfig) -> Prompt:
    """Check the inputs once for the whole call (the decoding steps then skip every check) → :class:`Prompt`.

    Errors name the problem and the fix: not a generating model, ids not (batch, seq), a mask of another shape or
    a float mask, an empty prompt without a BOS token, a prompt or source longer than the context.
    """
    if not isinstance(model, (DecoderLM, Transformer)):
        raise TypeError(f"generation needs a qkv DecoderLM or Transformer, got {type(model).__name__}; an "
                        "Encoder has no next-token distribution to sample from")
    mc = model.config
    if not isinstance(ids, Tensor) or ids.dim() != 2:
        shape = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"ids must be a (batch, seq) tensor of token ids, got {shape}; add a batch "
                         "dimension with ids.unsqueeze(0), or use generate_text for strings")
    if ids.shape[0] == 0:
        raise ValueError("ids holds no rows; give at least one prompt")
    model._check_ids(ids)
    ids = ids.long()
    stop = stop_token_ids(cfg, mc)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (
        mc.pad_token_id if mc.pad_token_id is not None else (stop[0] if stop else 0))
    bos = cfg.bos_token_id if cfg.bos_token_id is not None else mc.bos_token_id
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.shape != ids.shape:
            shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"attention_mask must have the shape of ids {tuple(ids.shape)}, got {shape} "
                             "(True at real tokens)")
        mask = check_mask(mask, "attention_mask").to(ids.device)  # bool or 1/0; float masks refused
        if bool(mask.all()):
            mask = None  # nothing is padding: the fast path needs no mask at all
        elif not isinstance(model, Transformer):
            # Padding anywhere (right_pad's output, or holes) becomes left padding: a stable sort moves each
            # row's real tokens, in order, to the end, so every row continues from its own last real token
            # exactly as it would alone. (A source sentence may be padded on either side.)
            order = mask.to(torch.int8).argsort(dim=-1, stable=True)
            ids, mask = ids.gather(1, order), mask.gather(1, order)
    empty = ids.shape[1] == 0 or (mask is not None and not bool(mask.any(-1).all()))
    if isinstance(model, Transformer):
        if empty:
            raise ValueError("a source sentence is empty; give every row at least one source token")
        if ids.shape[1] > mc.max_seq_len:
            raise ValueError(f"source of {ids.shape[1]} tokens is longer than the model's context "
                             f"max_seq_len={mc.max_seq_len}; shorten it")
        if bos is None:
            raise ValueError("the encoder-decoder model has no start token for the target "
                             "(ModelConfig.bos_token_id is None); pass bos_token_id=...")
        return Prompt(ids, mask, stop, pad, ids.new_full((ids.shape[0], 1), bos))
    if empty:
        if bos is None:
            raise ValueError("empty prompt, and the model has no beginning-of-sequence token to start from "
                             "(ModelConfig.bos_token_id is None); give at least one prompt token or pass "
                             "bos_token_id=...")
        # An empty prompt becomes [BOS]; the other rows stay as they are (as they would be alone).
        if ids.shape[1] == 0:
            ids = ids.new_full((ids.shape[0], 1), bos)
        else:  # left-padded: an empty row's last column becomes its one real token
            ids, mask = ids.clone(), mask.clone()
            empty_rows = ~mask.any(-1)
            ids[empty_rows, -1] = bos
            mask[empty_rows, -1] = True
    if ids.shape[1] > mc.max_seq_len:
        raise ValueError(f"prompt of {ids.shape[1]} tokens is longer than the model's context "
                         f"max_seq_len={mc.max_seq_len}; shorten the prompt (keep its last {mc.max_seq_len} "
                         "tokens at most)")
    return Prompt(ids, mask, stop, pad, ids)


def check_fits(model: DecoderLM | Transformer, prompt: Prompt, cfg: GenerationConfig) -> None:
    """The prompt (or the target's start token) plus max_new_tokens must fit the model's context."""
    used = prompt.start.shape[1] + cfg.max_new_tokens - 1  # the last new token is never fed back
    limit = model.config.max_seq_len
    if used > limit:
        what = "the start token" if isinstance(model, Transformer) else f"a prompt of {prompt.start.shape[1]} tokens"
        raise ValueError(f"{what} + max_new_tokens={cfg.max_new_tokens} need {used} positions but the model's "
                         f"context is max_seq_len={limit}; lower max_new_tokens to at most "
                         f"{limit - prompt.start.shape[1] + 1} or shorten the prompt")


class Stepper:
    """Feeds a model its prompt, then one token per row per step, and returns the next-token logits.

    With the cache, each step runs the model's own modules on the new token only (embeddings, the block stack
    with its KV caches, the output projection) and skips the per-call input checks and position/mask
    construction of ``forward``: those were done once for the whole call. Without the cache, each step runs
    the ordinary full ``forward`` over the whole prefix.
    """

    def __init__(self, model: DecoderLM | Transformer, ids: Tensor, mask: Tensor | None, max_new_tokens: int,
                 use_cache: bool):
        self.model, self.use_cache = model, use_cache
        self.seq2seq = isinstance(model, Transformer)
        batch = ids.shape[0]
        if self.seq2seq:  # ids is the source; the target starts empty (the caller feeds the start token)
            self.src_mask = mask
            self.memory = model.encode(ids, mask)
            self.src_mask4 = None if mask is None else padding_mask(mask)
            prefix = 0
        else:
            prefix = ids.shape[1]
        total = prefix + max_new_tokens + (1 if self.seq2seq else 0)  # callers checked it fits
        device = ids.device
        # positions[:, j] of the j-th token of each row (the prompt, then the new tokens): counted from each
        # row's first real token, so a left-padded row sees the positions it would see alone.
        if mask is not None and not self.seq2seq:
            first = (mask.cumsum(-1) - 1).clamp(min=0)
            nxt = first[:, -1:] + torch.arange(1, max_new_tokens + 1, device=device)
            self.positions = torch.cat([first, nxt], dim=1)
            self.full_mask = torch.cat([mask, mask.new_ones(batch, max_new_tokens)], dim=1)
        else:
            self.positions = torch.arange(total, device=device).unsqueeze(0)
            self.full_mask = None
        self.caches = model.new_cache(total) if use_cache else None
        self.cross_caches = model.new_cache(0) if use_cache and self.seq2seq else None
        self.tokens = ids if not self.seq2seq else ids.new_empty(batch, 0)  # the prefix (no-cache path)
        self.length = 0  # positions already in the cache

    def prefill(self, ids: Tensor | None = None) -> Tensor:
        """Run the prompt (decoder-only) or the start tokens (encoder-decoder); → logits (batch, vocab)."""
        if self.seq2seq:
            return self.step(ids)
        n = self.tokens.shape[1]
        if not self.use_cache:
            return check_finite(self._full())
        self.length = n
        return check_finite(self._run(self.tokens, n))

    def step(self, ids: Tensor) -> Tensor:
        """ids (batch, 1): the tokens just chosen → logits (batch, vocab) for the token after them."""
        if not self.use_cache:
            self.tokens = torch.cat([self.tokens, ids], dim=1)
            return check_finite(self._full())
        self.length += ids.shape[1]
        return check_finite(self._run(ids, self.length))

    def _run(self, ids: Tensor, n: int) -> Tensor:
        model, t = self.model, ids.shape[1]
        positions = self.positions[:, n - t: n]
        attend = model._attend_args(positions, t, n)
        x = model.embed(ids, positions)
        if self.seq2seq:
            first = self.memory is not None
            x, _, _ = model.decoder(x, mask=None, causal=True, context=self.memory, context_mask=self.src_mask4,
                                    caches=self.caches, cross_caches=self.cross_caches, **attend)
            if first:
                self.memory = None  # the cross-attention keys/values now live in cross_caches
        else:
            mask = None if self.full_mask is None else padding_mask(self.full_mask[:, :n])
            x, _, _ = model.layers(x, mask=mask, causal=True, caches=self.caches, **attend)
        return model.logits(x[:, -1])

    def _full(self) -> Tensor:
        n = self.tokens.shape[1]
        if self.seq2seq:
            return self.model.decode(self.tokens, self.memory, self.src_mask)[:, -1]
        mask = None if self.full_mask is None else self.full_mask[:, :n]
        return self.model(self.tokens, mask, positions=self.positions[:, :n])[:, -1]

    def reorder(self, index: Tensor) -> None:
        """Keep rows ``index`` (beam search). Rows only move within their own prompt's group of beams, so the
        per-row positions, masks and cross-attention caches (the same across a group) stay as they are."""
        if self.caches is not None:
            for cache in self.caches:
                cache.reorder(index)
        else:
            self.tokens = self.tokens.index_select(0, index)
