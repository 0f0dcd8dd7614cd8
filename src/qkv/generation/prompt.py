"""The checked inputs of one call (:func:`prepare`, run once per call) and the model fed one token at a time
(:class:`Stepper`)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..attention import check_mask
from ..models import evaluating, model_type_of, unwrap
from ..tokenizers import SEAM_CONTEXT
from .compiled import eager_module, is_compiled, state_capacity
from .config import GenerationConfig
from .logits import check_finite, seen_tokens
from .stopping import stop_token_ids

__all__ = ["Prompt", "prepare", "generating_kind", "check_fits", "Stepper", "evaluating"]


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


def _unchecked(logits: Tensor) -> Tensor:
    return logits


def generating_kind(model: Any) -> str:
    """"decoder" | "seq2seq": the kind of the qkv model that ``model`` is or wraps (peft, torch.compile, DDP,
    FSDP; see :func:`~qkv.models.unwrap`); anything else is a TypeError naming it."""
    try:
        kind, name = model_type_of(model), type(unwrap(model)).__name__
    except TypeError:
        kind, name = None, type(model).__name__
    if kind not in ("decoder", "seq2seq"):
        raise TypeError(f"generation needs a qkv DecoderLM or Transformer, got {name}; an Encoder has no "
                        "next-token distribution to sample from")
    return kind


def prepare(model: Any, ids: Tensor, mask: Tensor | None, cfg: GenerationConfig) -> Prompt:
    """Check the inputs once for the whole call (the decoding steps then skip every check) → :class:`Prompt`.

    ``model``: a DecoderLM or Transformer, or one wrapped by peft, torch.compile, DDP or FSDP. Errors name the
    problem and the fix: not a generating model, ids not (batch, seq), a mask of another shape or a float mask,
    an empty prompt without a BOS token, a prompt or source longer than the context.
    """
    seq2seq = generating_kind(model) == "seq2seq"
    core = unwrap(model)
    mc = core.config
    if not isinstance(ids, Tensor) or ids.dim() != 2:
        shape = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"ids must be a (batch, seq) tensor of token ids, got {shape}; add a batch "
                         "dimension with ids.unsqueeze(0), or use generate_text for strings")
    if ids.shape[0] == 0:
        raise ValueError("ids holds no rows; give at least one prompt")
    # Token ids (dtype, range) are checked by the model itself on the first call, before any token is chosen.
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
        elif not seq2seq:
            # Padding anywhere (right_pad's output, or holes) becomes left padding: a stable sort moves each
            # row's real tokens, in order, to the end, so every row continues from its own last real token
            # exactly as it would alone. (A source sentence may be padded on either side.)
            order = mask.to(torch.int8).argsort(dim=-1, stable=True)
            ids, mask = ids.gather(1, order), mask.gather(1, order)
    empty = ids.shape[1] == 0 or (mask is not None and not bool(mask.any(-1).all()))
    if seq2seq:
        if empty:
            raise ValueError("a source sentence is empty; give every row at least one source token")
        core.check_fits(ids.shape[1], what="source")
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
    return Prompt(ids, mask, stop, pad, ids)


def check_fits(model: nn.Module, prompt: Prompt, cfg: GenerationConfig) -> None:
    """The prompt (or the target's start token) must fit the model's context, and with ``sliding_window`` off so
    must prompt + max_new_tokens - 1 (the model's one check, :meth:`~qkv.DecoderLM.check_fits`)."""
    what = "target" if prompt.seq2seq else "prompt"  # a target starts as its one start token
    unwrap(model).check_fits(prompt.start.shape[1], cfg.max_new_tokens, sliding_window=bool(cfg.sliding_window),
                             what=what)


class Stepper:
    """Feeds a model its prompt, then one token per row per step → the next-token logits (batch, vocab).

    ``model`` may be a wrapper (peft, torch.compile, DDP, FSDP): a decoder-only model runs through the wrapper it
    was given (compiled, or with the wrapper's hooks); the config and the decode state come from the qkv model
    inside (``self.core``), which also runs an encoder-decoder's ``encode``/``decode``, methods no wrapper routes.
    With the cache, the model keeps the keys, values, positions and padding of the tokens fed so far in its decode
    state (``model.new_decode_state``) and each step feeds only the new token: ``model(ids, decode_state=...)``.
    Past ``max_seq_len`` the state slides a window of the last max_seq_len tokens when ``sliding_window`` (see
    :mod:`qkv.decode_state`). Without the cache, each step runs the ordinary forward over the whole prefix
    (past the context: over its last max_seq_len tokens, a fresh pass, so RoPE and ALiBi then differ from the
    cached window, whose deeper keys still carry older tokens).
    """

    def __init__(self, model: nn.Module, ids: Tensor, mask: Tensor | None, max_new_tokens: int,
                 use_cache: bool, sliding_window: bool = False, check: bool = True):
        self.model, self.core = model, unwrap(model)
        self.check = check_finite if check else _unchecked  # False: the caller checks the logits it reads
        self.seq2seq = self.core.model_type == "seq2seq"
        batch = ids.shape[0]
        if self.seq2seq:  # ids is the source; the target starts empty (the caller feeds the start token)
            self.src_mask, self.memory = mask, self.core.encode(ids, mask)
            self.tokens, self.mask = ids.new_empty(batch, 0), None
        else:
            self.tokens, self.mask = ids, mask
        # Room for the prompt (or start token) and every new token (the last is fed only by a caller that wants
        # the logits after it); at most max_seq_len positions are allocated.
        self.compiled = is_compiled(model)  # the prompt then runs eagerly, each one-token step through the graph
        fed = state_capacity(self.tokens.shape[1] + max_new_tokens + self.seq2seq, self.core.config.max_seq_len,
                             self.compiled)
        self.state = self.core.new_decode_state(batch, fed, sliding_window=sliding_window) if use_cache else None
        self.first = True

    def prefill(self, start: Tensor | None = None) -> Tensor:
        """Run the prompt (decoder-only) or the start tokens ``start`` (encoder-decoder) → logits (batch, vocab)."""
        if self.seq2seq:
            return self.step(start)
        if self.state is None:
            return self.check(self._full())
        # Only the last position's logits are needed: the output layer runs on it alone.
        logits = eager_module(self.model)(self.tokens, self.mask, decode_state=self.state, logits_to_keep=1)
        return self.check(logits[:, -1])

    def step(self, ids: Tensor) -> Tensor:
        """ids (batch, 1): the tokens just chosen → logits (batch, vocab) for the token after them."""
        if self.state is None:
            self.tokens = torch.cat([self.tokens, ids], dim=1)
            if self.mask is not None:
                self.mask = torch.cat([self.mask, torch.ones_like(ids, dtype=torch.bool)], dim=1)
            return self.check(self._full())
        if self.seq2seq:
            memory, self.first = (self.memory if self.first else None), False
            logits = self.core.decode(ids, memory, self.src_mask, decode_state=self.state)
        else:
            logits = self.model(ids, decode_state=self.state)
        return self.check(logits[:, -1])

    def _full(self) -> Tensor:
        """The plain forward over the prefix (its last max_seq_len tokens) → the last position's logits."""
        window = self.core.config.max_seq_len
        tokens = self.tokens[:, -window:]
        if self.seq2seq:
            return self.core.decode(tokens, self.memory, self.src_mask)[:, -1]
        model = eager_module(self.model)  # a prefix that grows each step: a compiled graph would recompile each time
        if self.mask is None:
            return model(tokens)[:, -1]
        mask = self.mask[:, -window:]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # counted from each row's first real token
        return model(tokens, mask, positions=positions)[:, -1]

    def reorder(self, index: Tensor) -> None:
        """Keep rows ``index`` (beam search): the decode state follows, or the prefix without the cache."""
        if self.state is not None:
            self.state.reorder(index)
        else:
            self.tokens = self.tokens.index_select(0, index)
            if self.mask is not None:
                self.mask = self.mask.index_select(0, index)


