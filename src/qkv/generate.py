"""Writing text one token at a time: x_{t+1} ~ softmax(processed(logits_t)), with a key/value cache.

One configuration, a few entry points:

- :class:`GenerationConfig`: every knob (greedy or sampling, temperature, top-k, top-p, repetition penalty,
  min/max new tokens, stop token ids and stop strings, seed, beams, length penalty, cache on/off).
- :func:`generate` → a tensor of token ids; :func:`stream` → an iterator yielding each step's new tokens;
  :func:`beam_search` → the best hypothesis per row. ``generate`` dispatches to ``beam_search`` when
  ``num_beams > 1``.
- :func:`generate_text` / :func:`stream_text`: the same with a tokenizer, text in and text out.
- :func:`generate_seq2seq`: the entry point for translation with the encoder-decoder :class:`~qkv.Transformer`
  (greedy or beam search, batched sources with padding masks) → lists of target ids.

Every function takes a ``DecoderLM`` (ids = the prompt; the result is prompt + continuation) or a
``Transformer`` (ids = the source sentence; the result is the target, starting with its start token).
Batches of prompts of different lengths are **left**-padded (:func:`left_pad`) with an ``attention_mask``
(True at real tokens); each row then decodes exactly as it would alone, because absolute positions are
counted from each row's first real token.

Example::

    from qkv.generate import generate, GenerationConfig
    out = generate(model, ids, 50, temperature=0)                  # greedy
    out = generate(model, ids, config=GenerationConfig(max_new_tokens=50, temperature=0.8, top_p=0.9, seed=1))
    for tokens in stream(model, ids, 50, temperature=0):           # (batch,) tensor per step
        ...
    targets = generate_seq2seq(transformer, src_ids, src_mask, num_beams=4)   # alpha = 0.6 (GNMT)
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .attention import check_mask, padding_mask
from .models import DecoderLM, Transformer

__all__ = [
    "GenerationConfig",
    "generate",
    "stream",
    "beam_search",
    "generate_text",
    "stream_text",
    "generate_seq2seq",
    "left_pad",
    "right_pad",
    "next_token_probs",
    "filter_top_k",
    "filter_top_p",
    "apply_repetition_penalty",
    "gnmt_length_penalty",
    "find_stop",
    "decode_continuation",
]


# --------------------------------------------------------------------------------------------------------------
# Configuration.
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationConfig:
    """How to choose each next token, and when to stop.

    - ``temperature``: 0 = greedy (argmax); otherwise sample from softmax(logits / temperature).
    - ``top_k``: sample only among the k most likely tokens (None = all).
    - ``top_p``: sample only from the nucleus, the smallest set of most likely tokens whose probability
      reaches top_p (1.0 = all).
    - ``repetition_penalty``: divide positive / multiply negative logits of tokens already present (CTRL);
      1.0 = off.
    - ``min_new_tokens`` / ``max_new_tokens``: stopping is impossible before the minimum; the maximum bounds it.
    - ``stop_token_ids``: a row stops after producing one of these (the token is kept in the ids). None means
      the model's ``eos_token_id`` if it has one; ``()`` means never.
    - ``stop_strings``: a row stops once its generated text contains one (needs ``tokenizer=``); the text
      functions cut the text before the stop string.
    - ``seed``: the same seed gives the same tokens (a private generator; the global RNG is not touched).
    - ``num_beams`` > 1: beam search, scoring log P(Y) / lp(Y) with lp(Y) = ((5 + |Y|) / 6)^length_penalty
      (GNMT; 0.6 as in "Attention Is All You Need"); ``early_stopping``: a row is done once it holds
      ``num_beams`` finished hypotheses (otherwise: once no live beam can still beat the worst finished one).
    - ``use_cache``: keep keys/values between steps (False recomputes the whole prefix each step: slow, for
      comparison).
    - ``bos_token_id``: the decoder's start token (encoder-decoder) and the prompt for an empty prompt;
      ``pad_token_id``: what fills rows that stopped early. None = the model's own.
    """

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] | None = None
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    num_beams: int = 1
    length_penalty: float = 0.6
    early_stopping: bool = True
    use_cache: bool = True
    bos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        def integer(name: str, low: int) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}")

        integer("max_new_tokens", 0)
        integer("min_new_tokens", 0)
        integer("num_beams", 1)
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens={self.min_new_tokens} must be <= max_new_tokens="
                             f"{self.max_new_tokens}")
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy, 1 = the model's "
                             "own distribution)")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 1, or None to keep every token")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must lie in (0, 1]; 1 keeps every token")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0 (1 = off, > 1 "
                             "discourages repeats)")
        if not self.length_penalty >= 0:
            raise ValueError(f"length_penalty={self.length_penalty} must be >= 0 (0 = none, 0.6 = GNMT)")
        for name in ("stop_token_ids", "stop_strings"):  # accept lists, store tuples (the config is frozen)
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple([value] if isinstance(value, (int, str)) else value))
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(f"stop_strings={self.stop_strings!r} must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **changes: Any) -> GenerationConfig:
        """A copy with some fields changed (an unknown name is an error naming the closest field)."""
        known = [f.name for f in dataclasses.fields(self)]
        for key in changes:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known options: {', '.join(known)}"
                raise TypeError(f"unknown generation option {key!r}; {hint}")
        return dataclasses.replace(self, **changes)


def _resolve(config: GenerationConfig | None, max_new_tokens: int | None, options: dict[str, Any]
             ) -> GenerationConfig:
    config = GenerationConfig() if config is None else config
    if max_new_tokens is not None:
        options = {**options, "max_new_tokens": max_new_tokens}
    return config.replace(**options) if options else config


# --------------------------------------------------------------------------------------------------------------
# The formulas that turn logits into a choice.
# --------------------------------------------------------------------------------------------------------------


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

    The distribution :func:`generate` samples from; temperature 0 puts all mass on the argmax.
    """
    if temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / temperature
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    logits = filter_top_p(logits, top_p)
    return logits.softmax(-1)


def gnmt_length_penalty(length: int, alpha: float) -> float:
    """lp(Y) = ((5 + |Y|) / 6)^alpha (Wu et al. 2016, GNMT); a hypothesis scores log P(Y) / lp(Y)."""
    return ((5.0 + length) / 6.0) ** alpha


def find_stop(text: str, stop_strings: Sequence[str], start: int = 0) -> int:
    """The index in ``text`` where the earliest stop string begins (searching from ``start``), or -1."""
    found = [i for i in (text.find(s, start) for s in stop_strings) if i >= 0]
    return min(found) if found else -1


SEAM_CONTEXT = 8  # context tokens decoded before a continuation: enough for any decoder's seam rule


def decode_continuation(tokenizer: Any, context: Sequence[int], new: Sequence[int]) -> str:
    """The text ``new`` adds after ``context``: decode(context + new) minus decode(context).

    SentencePiece-style decoders (Metaspace, as LLaMA-2, TinyLlama and Mistral ship) drop the space that begins a
    text, so a continuation decoded on its own loses the space at the seam ("The capital is" + "Paris"); decoded
    after its context it keeps it. Only the last ``SEAM_CONTEXT`` context tokens are decoded: the seam is local.
    """
    context = list(context)[-SEAM_CONTEXT:]
    head = tokenizer.decode(context) if context else ""
    whole = tokenizer.decode(context + list(new))
    if not whole.startswith(head):  # the seam changed the context's own text (a character completed across it)
        head = head[: len(os.path.commonprefix([head, whole]))]
    return whole[len(head):]


def _pad(sequences: Sequence[Sequence[int]], pad_id: int, *, left: bool) -> tuple[Tensor, Tensor]:
    """Token-id lists of different lengths → (ids, attention_mask), both (batch, longest); mask True = real."""
    if not sequences:
        raise ValueError("no sequences to pad; give at least one prompt")
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), longest, dtype=torch.bool)
    for row, seq in enumerate(sequences):
        if len(seq):
            cols = slice(longest - len(seq), longest) if left else slice(0, len(seq))
            ids[row, cols] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, cols] = True
    return ids, mask


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Pad on the left: every prompt's last token lands in the last column, so all rows predict their next
    token at the same step (decoder prompts)."""
    return _pad(sequences, pad_id, left=True)


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Pad on the right: every row starts at position 0 (encoder inputs, teacher-forced targets)."""
    return _pad(sequences, pad_id, left=False)


# --------------------------------------------------------------------------------------------------------------
# Running a model one step at a time.
# --------------------------------------------------------------------------------------------------------------


class _Stepper:
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
            return _finite(self._full())
        self.length = n
        return _finite(self._run(self.tokens, n))

    def step(self, ids: Tensor) -> Tensor:
        """ids (batch, 1): the tokens just chosen → logits (batch, vocab) for the token after them."""
        if not self.use_cache:
            self.tokens = torch.cat([self.tokens, ids], dim=1)
            return _finite(self._full())
        self.length += ids.shape[1]
        return _finite(self._run(ids, self.length))

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


def _finite(logits: Tensor) -> Tensor:
    """The model's next-token logits, refused when any is NaN or infinite (softmax and sampling would fail on them,
    or greedy decoding would pick an arbitrary token)."""
    if not bool(torch.isfinite(logits).all()):
        rows = (~torch.isfinite(logits)).any(-1).nonzero().flatten().tolist()
        raise ValueError(f"the model's next-token logits hold NaN or infinity (rows {rows[:5]}): its weights or "
                         "activations are not finite; check the weights with torch.isfinite, or run in float32 "
                         "if a bfloat16/float16 model overflows")
    return logits


class _Prompt(NamedTuple):
    """The checked inputs of one call."""

    ids: Tensor  # (batch, prompt) for a DecoderLM, (batch, source) for a Transformer
    mask: Tensor | None  # True at real tokens; None when every token is real
    stop: tuple[int, ...]  # stop token ids
    pad: int  # fills rows that stopped
    start: Tensor  # what the output starts with: the prompt, or the target's start token (batch, 1)


def _prepare(model: Any, ids: Tensor, mask: Tensor | None, cfg: GenerationConfig) -> _Prompt:
    """Check the inputs once for the whole call (the decoding steps then skip every check)."""
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
    stop = tuple(cfg.stop_token_ids) if cfg.stop_token_ids is not None else (
        () if mc.eos_token_id is None else (mc.eos_token_id,))
    for t in stop:
        if not 0 <= t < mc.vocab_size:
            raise ValueError(f"stop token id {t} is outside [0, vocab_size={mc.vocab_size}); pass ids of the "
                             "model's vocabulary")
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
        return _Prompt(ids, mask, stop, pad, ids.new_full((ids.shape[0], 1), bos))
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
    return _Prompt(ids, mask, stop, pad, ids)


class _StopStrings:
    """Per row: has the generated text come to contain a stop string? (Decodes each row's new tokens after the
    end of its prompt, ``context``, so the text at the seam reads as it will be printed.)"""

    def __init__(self, cfg: GenerationConfig, tokenizer: Any, batch: int, context: list[list[int]] | None = None):
        if cfg.stop_strings and tokenizer is None:
            raise ValueError(f"stop_strings={cfg.stop_strings!r} need the tokenizer to read the text: pass "
                             "tokenizer=...")
        self.strings, self.tokenizer = cfg.stop_strings, tokenizer
        self.context = context or [[] for _ in range(batch)]
        self.generated: list[list[int]] = [[] for _ in range(batch)]
        self.longest = max((len(s) for s in self.strings), default=0)
        self.searched = [0] * batch  # characters of each row's text already searched

    def hit(self, tokens: list[int], live: list[bool]) -> list[bool]:
        found = [False] * len(tokens)
        for row, token in enumerate(tokens):
            if not live[row]:
                continue
            self.generated[row].append(token)
            text = decode_continuation(self.tokenizer, self.context[row], self.generated[row])
            found[row] = find_stop(text, self.strings, max(0, self.searched[row] - self.longest + 1)) >= 0
            self.searched[row] = len(text)
        return found


def _prompt_tails(prompt: _Prompt) -> list[list[int]]:
    """Each row's last real prompt tokens (decoder-only; a target starts with nothing before it)."""
    if prompt.start is not prompt.ids:
        return [[] for _ in range(prompt.ids.shape[0])]
    ids = prompt.ids[:, -SEAM_CONTEXT:]
    if prompt.mask is None:
        return ids.tolist()
    return [[t for t, real in zip(row, keep, strict=True) if real]
            for row, keep in zip(ids.tolist(), prompt.mask[:, -SEAM_CONTEXT:].tolist(), strict=True)]


def _seen_tokens(prompt: _Prompt, vocab_size: int, rows: int) -> Tensor:
    """(rows, vocab) bool: which tokens each row's prompt holds (what the repetition penalty discourages)."""
    seen = torch.zeros(rows, vocab_size + 1, dtype=torch.bool, device=prompt.ids.device)
    if rows == prompt.ids.shape[0] and prompt.start is prompt.ids:  # decoder-only: the prompt counts
        ids = prompt.ids if prompt.mask is None else prompt.ids.masked_fill(~prompt.mask, vocab_size)
        seen.scatter_(1, ids, True)  # padding lands in the extra column, dropped below
    return seen[:, :vocab_size]


def _processed(logits: Tensor, step: int, cfg: GenerationConfig, seen: Tensor | None,
               stop_ids: Tensor | None) -> Tensor:
    """The logits after the repetition penalty and, before min_new_tokens, with the stop tokens forbidden."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if stop_ids is not None and step < cfg.min_new_tokens:
        logits = logits.index_fill(-1, stop_ids, float("-inf"))
    return logits


# --------------------------------------------------------------------------------------------------------------
# Greedy decoding and sampling.
# --------------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def _decode(model: DecoderLM | Transformer, prompt: _Prompt, cfg: GenerationConfig, tokenizer: Any
            ) -> Iterator[Tensor]:
    """Yield (batch,) next tokens, one step at a time; rows that stopped get the pad id; ends when all did."""
    if cfg.max_new_tokens == 0:
        return
    ids, mask, stop, pad = prompt.ids, prompt.mask, prompt.stop, prompt.pad
    batch, n_new, device = ids.shape[0], cfg.max_new_tokens, ids.device
    stop_strings = _StopStrings(cfg, tokenizer, batch, _prompt_tails(prompt) if cfg.stop_strings else None)
    was_training = model.training
    model.eval()
    try:
        stepper = _Stepper(model, ids, mask, n_new, cfg.use_cache)
        generator = None if cfg.seed is None else torch.Generator(device).manual_seed(cfg.seed)
        stop_ids = torch.tensor(stop, dtype=torch.long, device=device) if stop else None
        seen = _seen_tokens(prompt, model.config.vocab_size, batch) if cfg.repetition_penalty != 1.0 else None
        finished = torch.zeros(batch, dtype=torch.bool, device=device) if (stop or cfg.stop_strings) else None
        logits = stepper.prefill(None if prompt.start is ids else prompt.start)
        greedy, filtering = cfg.greedy, cfg.top_k is not None or cfg.top_p < 1.0
        for step in range(n_new):
            logits = _processed(logits, step, cfg, seen, stop_ids)
            if greedy:
                token = logits.argmax(-1)
            elif filtering:
                probs = next_token_probs(logits, cfg.temperature, cfg.top_k, cfg.top_p)
                token = torch.multinomial(probs, 1, generator=generator)[:, 0]
            else:
                token = torch.multinomial((logits / cfg.temperature).softmax(-1), 1, generator=generator)[:, 0]
            if finished is not None:
                token = token.masked_fill(finished, pad)
                done = torch.isin(token, stop_ids) if stop_ids is not None else torch.zeros_like(finished)
                if cfg.stop_strings:
                    hits = stop_strings.hit(token.tolist(), (~finished).tolist())
                    done |= torch.tensor(hits, device=device)
                if step >= cfg.min_new_tokens:
                    finished = finished | done
            if seen is not None:
                seen[torch.arange(batch, device=device), token] = True
            yield token
            if step + 1 == n_new or (finished is not None and bool(finished.all())):
                return
            logits = stepper.step(token.unsqueeze(1))
    finally:
        model.train(was_training)


def stream(model: DecoderLM | Transformer, ids: Tensor, max_new_tokens: int | None = None, *,
           config: GenerationConfig | None = None, attention_mask: Tensor | None = None, tokenizer: Any = None,
           **options: Any) -> Iterator[Tensor]:
    """Yield each step's new tokens, a (batch,) LongTensor, as soon as they are chosen.

    ``ids``: (batch, prompt) for a DecoderLM (left-padded with ``attention_mask`` when lengths differ, see
    :func:`left_pad`), or the (batch, source) sentence for a Transformer (padded with ``attention_mask``).
    Options are :class:`GenerationConfig` fields. Rows that have stopped yield the pad id; the iterator ends
    when every row stopped or after ``max_new_tokens``. Inputs are checked here, before the first token.
    Beam search cannot stream (the best hypothesis is known only at the end); use :func:`beam_search`.
    """
    cfg = _resolve(config, max_new_tokens, options)
    if cfg.num_beams > 1:
        raise ValueError(f"num_beams={cfg.num_beams}: beam search cannot stream, since the best hypothesis is "
                         "known only at the end; call beam_search() or generate(), or use num_beams=1")
    prompt = _prepare(model, ids, attention_mask, cfg)
    _check_fits(model, prompt, cfg)
    _StopStrings(cfg, tokenizer, 0)  # a missing tokenizer is an error now, not at the first token
    return _decode(model, prompt, cfg, tokenizer)


def generate(model: DecoderLM | Transformer, ids: Tensor, max_new_tokens: int | None = None, *,
             config: GenerationConfig | None = None, attention_mask: Tensor | None = None, tokenizer: Any = None,
             **options: Any) -> Tensor:
    """Continue each row → (batch, prompt + new) ids for a DecoderLM, (batch, 1 + new) targets for a Transformer.

    ``generate(model, ids, 50, temperature=0)`` is greedy; ``temperature``, ``top_k``, ``top_p``, ``seed`` and
    every other :class:`GenerationConfig` field may be given by keyword or as ``config=``. Rows that stopped
    early (a stop token, kept, or a stop string) are filled with the pad id; the tensor ends when the last
    row stopped. A Transformer's target starts with its start token (``bos_token_id``). ``num_beams > 1``
    runs :func:`beam_search`.
    """
    cfg = _resolve(config, max_new_tokens, options)
    if cfg.num_beams > 1:
        return beam_search(model, ids, config=cfg, attention_mask=attention_mask)
    prompt = _prepare(model, ids, attention_mask, cfg)
    _check_fits(model, prompt, cfg)
    steps = list(_decode(model, prompt, cfg, tokenizer))
    return torch.cat([prompt.start, torch.stack(steps, 1)], dim=1) if steps else prompt.start.clone()


def _check_fits(model: DecoderLM | Transformer, prompt: _Prompt, cfg: GenerationConfig) -> None:
    """The prompt (or the target's start token) plus max_new_tokens must fit the model's context."""
    used = prompt.start.shape[1] + cfg.max_new_tokens - 1  # the last new token is never fed back
    limit = model.config.max_seq_len
    if used > limit:
        what = "the start token" if isinstance(model, Transformer) else f"a prompt of {prompt.start.shape[1]} tokens"
        raise ValueError(f"{what} + max_new_tokens={cfg.max_new_tokens} need {used} positions but the model's "
                         f"context is max_seq_len={limit}; lower max_new_tokens to at most "
                         f"{limit - prompt.start.shape[1] + 1} or shorten the prompt")


# --------------------------------------------------------------------------------------------------------------
# Beam search.
# --------------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def beam_search(model: DecoderLM | Transformer, ids: Tensor, max_new_tokens: int | None = None, *,
                config: GenerationConfig | None = None, attention_mask: Tensor | None = None,
                return_scores: bool = False, **options: Any) -> Tensor | tuple[Tensor, Tensor]:
    """Keep the ``num_beams`` best partial hypotheses per row; → the best finished one, as :func:`generate` does.

    A hypothesis Y scores log P(Y | prompt) / lp(Y), lp(Y) = ((5 + |Y|) / 6)^alpha with alpha =
    ``length_penalty`` (0.6 by default, GNMT; |Y| counts the generated tokens, the stop token included).
    A hypothesis is finished when it ends in a stop token, or at ``max_new_tokens``. With ``early_stopping``
    a row is done as soon as it holds ``num_beams`` finished hypotheses; without, once no live hypothesis can
    still beat the worst of them. Deterministic: temperature, top-k, top-p and seed do not apply; the
    repetition penalty and min_new_tokens do. ``return_scores=True`` also returns each row's best score.
    """
    cfg = _resolve(config, max_new_tokens, options)
    if cfg.stop_strings:
        raise ValueError("stop_strings work with sampling and greedy decoding (num_beams=1); beam search stops "
                         "on stop_token_ids")
    prompt = _prepare(model, ids, attention_mask, cfg)
    _check_fits(model, prompt, cfg)
    n_batch, beams, vocab = prompt.ids.shape[0], cfg.num_beams, model.config.vocab_size
    device, n_new = prompt.ids.device, cfg.max_new_tokens
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(n_batch)]
    if n_new == 0:
        return (prompt.start.clone(), torch.zeros(n_batch)) if return_scores else prompt.start.clone()
    stop_set = set(prompt.stop)
    was_training = model.training
    model.eval()
    try:
        expand = torch.arange(n_batch, device=device).repeat_interleave(beams)  # row b*beams + j → prompt b
        mask = None if prompt.mask is None else prompt.mask[expand]
        stepper = _Stepper(model, prompt.ids[expand], mask, n_new, cfg.use_cache)
        stop_ids = torch.tensor(prompt.stop, dtype=torch.long, device=device) if prompt.stop else None
        seen = (_seen_tokens(prompt, vocab, n_batch)[expand] if cfg.repetition_penalty != 1.0 else None)
        logits = stepper.prefill(None if prompt.start is prompt.ids else prompt.start[expand])
        scores = torch.full((n_batch, beams), float("-inf"), device=device)
        scores[:, 0] = 0.0  # at first every beam holds the same prompt: expand only one of them
        history = torch.empty(n_batch * beams, 0, dtype=torch.long, device=device)
        done = [False] * n_batch
        n_candidates = min(beams * (1 + len(stop_set)), beams * vocab)  # enough to find `beams` live ones
        for step in range(n_new):
            log_probs = _processed(logits, step, cfg, seen, stop_ids).float().log_softmax(-1)
            total = (scores.unsqueeze(-1) + log_probs.view(n_batch, beams, vocab)).view(n_batch, -1)
            top_scores, top_index = total.topk(n_candidates, dim=-1)
            rows, tokens, new_scores = [], [], []
            hist: list[list[int]] = []  # the hypotheses as lists, converted only when one finishes
            for b, (row_scores, row_index) in enumerate(zip(top_scores.tolist(), top_index.tolist(), strict=True)):
                live: list[tuple[int, int, float]] = []
                if not done[b]:
                    for rank, (score, index) in enumerate(zip(row_scores, row_index, strict=True)):
                        if score == float("-inf") or len(live) == beams:
                            break
                        beam, token = divmod(index, vocab)
                        if token in stop_set:
                            if rank < beams:  # a stop token among the best `beams` candidates ends a hypothesis
                                hist = hist or history.tolist()
                                hyp = hist[b * beams + beam] + [token]
                                finished[b].append((score / gnmt_length_penalty(len(hyp), cfg.length_penalty),
                                                    hyp))
                        else:
                            live.append((b * beams + beam, token, score))
                    done[b] = _beam_row_done(finished[b], live, step, cfg)
                while len(live) < beams:  # a finished row (or too few candidates): filler nobody extends
                    live.append((b * beams, prompt.pad, float("-inf")))
                for row, token, score in live:
                    rows.append(row)
                    tokens.append(token)
                    new_scores.append(score)
            if all(done):
                break
            index = torch.tensor(rows, device=device)
            token_t = torch.tensor(tokens, device=device)
            history = torch.cat([history[index], token_t.unsqueeze(1)], dim=1)
            scores = torch.tensor(new_scores, device=device).view(n_batch, beams)
            if seen is not None:
                seen = seen[index]
                seen[torch.arange(len(rows), device=device), token_t] = True
            if step + 1 == n_new:
                break
            stepper.reorder(index)
            logits = stepper.step(token_t.unsqueeze(1))
        hist = history.tolist()
        for b in range(n_batch):
            if not done[b]:  # out of steps: the live hypotheses compete too
                for j in range(beams):
                    score = float(scores[b, j])
                    if score > float("-inf"):
                        hyp = hist[b * beams + j]
                        finished[b].append((score / gnmt_length_penalty(len(hyp), cfg.length_penalty), hyp))
    finally:
        model.train(was_training)
    best = [max(hyps, key=lambda h: h[0]) for hyps in finished]
    longest = max(len(h) for _, h in best)
    out = torch.full((n_batch, longest), prompt.pad, dtype=torch.long, device=device)
    for b, (_, hyp) in enumerate(best):
        out[b, : len(hyp)] = torch.tensor(hyp, dtype=torch.long)
    out = torch.cat([prompt.start, out], dim=1)
    return (out, torch.tensor([s for s, _ in best])) if return_scores else out


def _beam_row_done(finished: list[tuple[float, list[int]]], live: list[tuple[int, int, float]], step: int,
                   cfg: GenerationConfig) -> bool:
    """Is this row's search over? Needs num_beams finished hypotheses, and (without early stopping) no live
    one that could still beat the worst of the best num_beams: log P only falls as Y grows, so a live score
    s can at best become s / lp(max_new_tokens) (alpha > 0) or s / lp(now) (alpha = 0)."""
    if len(finished) < cfg.num_beams:
        return False
    if cfg.early_stopping or not live:
        return True
    worst_kept = sorted((s for s, _ in finished), reverse=True)[cfg.num_beams - 1]
    best_live = max(s for _, _, s in live)
    length = cfg.max_new_tokens if cfg.length_penalty > 0 else step + 1
    return best_live / gnmt_length_penalty(length, cfg.length_penalty) <= worst_kept


# --------------------------------------------------------------------------------------------------------------
# Text in, text out; translation.
# --------------------------------------------------------------------------------------------------------------


def _continuation(tokens: list[int], stop: tuple[int, ...]) -> list[int]:
    """The generated tokens up to (not including) the first stop token."""
    for i, t in enumerate(tokens):
        if t in stop:
            return tokens[:i]
    return tokens


def generate_text(model: DecoderLM | Transformer, tokenizer: Any, prompts: str | Sequence[str],
                  max_new_tokens: int | None = None, *, config: GenerationConfig | None = None,
                  **options: Any) -> str | list[str]:
    """Text in, generated text out (the continuation only, cut before a stop token or stop string).

    One string gives one string; a list gives a list, decoded as one padded batch. For a Transformer the
    prompts are source sentences and the result their targets. Each prompt is encoded as the model's own
    tokenizer specifies (with the BOS its post-processor adds, as transformers does); the continuation is
    decoded after the end of its prompt, so the space at the seam is kept (:func:`decode_continuation`).
    """
    cfg = _resolve(config, max_new_tokens, options)
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    encoded = [tokenizer.encode(t, add_special_tokens=True) for t in texts]
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (tokenizer.pad_id or 0)
    seq2seq = isinstance(model, Transformer)
    ids, mask = (right_pad if seq2seq else left_pad)(encoded, pad)
    if cfg.bos_token_id is None and model.config.bos_token_id is None and tokenizer.bos_id is not None:
        cfg = cfg.replace(bos_token_id=tokenizer.bos_id)
    out = generate(model, ids, config=cfg, attention_mask=mask, tokenizer=tokenizer)
    prompt = _prepare(model, ids, mask, cfg)  # (cheap) the same checks generate did: where the new tokens begin
    new = out[:, prompt.start.shape[1]:].tolist()
    results = []
    for context, tokens in zip(encoded, new, strict=True):
        text = decode_continuation(tokenizer, [] if seq2seq else context, _continuation(tokens, prompt.stop))
        cut = find_stop(text, cfg.stop_strings) if cfg.stop_strings else -1
        results.append(text if cut < 0 else text[:cut])
    return results[0] if single else results


def stream_text(model: DecoderLM | Transformer, tokenizer: Any, prompt: str, max_new_tokens: int | None = None,
                *, config: GenerationConfig | None = None, **options: Any) -> Iterator[str]:
    """Yield the continuation of one prompt as pieces of text, as soon as they are certain.

    The prompt is encoded and every input checked here, before the first piece (an error comes before any
    output). A piece is held back while it might still turn out to begin a stop string, or while it ends
    inside a multi-byte character (byte-level BPE); the stop string itself is never yielded. The text is
    decoded after the end of the prompt, as :func:`generate_text` does.
    """
    cfg = _resolve(config, max_new_tokens, options)
    if cfg.bos_token_id is None and model.config.bos_token_id is None and tokenizer.bos_id is not None:
        cfg = cfg.replace(bos_token_id=tokenizer.bos_id)
    encoded = tokenizer.encode(prompt, add_special_tokens=True)
    ids = torch.tensor([encoded], dtype=torch.long)
    tokens = stream(model, ids, config=cfg, tokenizer=tokenizer)  # checks the inputs now
    stop = _prepare(model, ids, None, cfg).stop
    context = [] if isinstance(model, Transformer) else encoded
    return _text_pieces(tokens, tokenizer, context, stop, cfg.stop_strings)


def _text_pieces(tokens: Iterator[Tensor], tokenizer: Any, context: list[int], stop: tuple[int, ...],
                 stop_strings: tuple[str, ...]) -> Iterator[str]:
    """The pieces :func:`stream_text` yields, from the (1,) token tensors :func:`stream` yields."""
    hold = max((len(s) for s in stop_strings), default=1) - 1
    generated: list[int] = []
    text, emitted = "", 0
    for token in tokens:
        t = int(token[0])
        if t in stop:
            break
        generated.append(t)
        text = decode_continuation(tokenizer, context, generated)
        cut = find_stop(text, stop_strings, max(0, emitted - hold)) if stop_strings else -1
        if cut >= 0:
            text = text[:cut]
            break
        safe = len(text) - hold - (1 if text.endswith("\ufffd") else 0)
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
    if len(text) > emitted:
        yield text[emitted:]


def generate_seq2seq(model: Transformer, src_ids: Tensor | Sequence[Sequence[int]],
                     src_attention_mask: Tensor | None = None, *, num_beams: int = 1, length_penalty: float = 0.6,
                     max_new_tokens: int | None = None, bos_token_id: int | None = None,
                     eos_token_id: int | None = None, **options: Any) -> list[list[int]]:
    """Translate a batch with the encoder-decoder Transformer → each row's target ids (no start, no end token).

    ``src_ids``: (batch, source) ids with ``src_attention_mask`` True at real tokens (pad on either side), or
    a list of id lists (padded here). ``num_beams=1`` is greedy; ``num_beams=4, length_penalty=0.6`` is the
    paper's beam search. ``bos_token_id`` / ``eos_token_id`` default to the model config's; decoding stops
    at EOS. ``max_new_tokens`` defaults to source length + 50 (as in the paper), capped by the context.
    Other options are :class:`GenerationConfig` fields (e.g. ``temperature`` for sampling when num_beams=1;
    the default is greedy).
    """
    if not isinstance(model, Transformer):
        raise TypeError(f"generate_seq2seq needs a qkv Transformer (encoder-decoder), got {type(model).__name__};"
                        " use generate() for a DecoderLM")
    if not isinstance(src_ids, Tensor):
        src_ids, src_attention_mask = right_pad(src_ids, model.config.pad_token_id or 0)
    if max_new_tokens is None:
        max_new_tokens = min(src_ids.shape[1] + 50, model.config.max_seq_len)
    eos = eos_token_id if eos_token_id is not None else model.config.eos_token_id
    options.setdefault("temperature", 0.0)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, num_beams=num_beams, length_penalty=length_penalty,
                           bos_token_id=bos_token_id, stop_token_ids=None if eos is None else (eos,)).replace(
        **options)
    out = generate(model, src_ids, config=cfg, attention_mask=src_attention_mask)
    stop = () if eos is None else (eos,)
    return [_continuation(row, stop) for row in out[:, 1:].tolist()]
