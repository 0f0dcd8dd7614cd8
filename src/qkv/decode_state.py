"""``DecodeState``: what a model keeps between decoding steps, created by the model and passed back to it.

    state = model.new_decode_state(batch, max_len)
    logits = model(prompt_ids, attention_mask, decode_state=state)      # (batch, prompt, vocab)
    logits = model(next_ids, decode_state=state)                        # (batch, 1, vocab), and so on

It holds, in tensors allocated once at a fixed shape and written in place:

- one key/value cache per decoder layer, ``(batch, kv_heads, capacity, d_k)``;
- the token ids whose keys are cached, ``(batch, capacity)`` (to re-encode a window, below);
- the padding mask of those tokens (None while no token was padding), True at real tokens;
- each row's next position, counted from the row's first real token, so that a left-padded row sees the
  positions it would see alone;
- for an encoder-decoder, the cross-attention keys/values of the encoder output and the source mask.

**Past the context** (more than ``max_seq_len`` tokens) the state slides a window of the last ``max_seq_len``
tokens, unless it was created with ``sliding_window=False`` (then the step is refused). How depends on the
positional encoding:

- relative or no positions (``rope``, ``alibi``, ``none``): the oldest keys and values are dropped and positions
  keep counting. Scores depend on position differences only, so each new token attends to the last
  ``max_seq_len`` tokens exactly as a forward pass over the whole sequence with a *sliding-window* causal mask
  would (Mistral's sliding-window attention). It is not a fresh forward pass over the window: keys of a deeper
  layer still carry what their token saw before older tokens left the window.
- absolute positions (``sinusoidal``, ``learned``): a position the model never saw has no meaning, so the window
  is re-encoded from position 0 whenever a real token must leave it: each such step equals a forward pass
  without cache over the most recent ``max_seq_len`` tokens (and costs one).

Dropping only padding (the oldest slots of a left-padded row) changes nothing, so it never re-encodes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .attention import KVCache

__all__ = ["DecodeState", "ROLLING_POSITIONALS"]

# Positional encodings whose cache may roll: attention scores depend only on position differences (or on
# nothing), so keys computed at earlier positions stay valid as the window slides.
ROLLING_POSITIONALS = ("rope", "alibi", "none")


class DecodeState:
    """Per-row decoding state of one batch (see the module docstring). Create it with
    ``model.new_decode_state(batch, max_len)``; only the model reads and writes it.

    ``capacity`` = min(max_len, max_seq_len) positions are allocated. ``length`` is how many are filled.
    """

    def __init__(self, *, batch: int, capacity: int, max_len: int, max_seq_len: int, positional: str,
                 sliding_window: bool, caches: list[KVCache], cross_caches: list[KVCache] | None,
                 device: torch.device):
        self.batch, self.capacity, self.max_len, self.max_seq_len = batch, capacity, max_len, max_seq_len
        self.sliding_window = sliding_window
        self.rolls = positional in ROLLING_POSITIONALS
        self.caches, self.cross_caches = caches, cross_caches
        # The ids are kept only where a window may be re-encoded: a sliding state with absolute positions.
        self.keeps_ids = sliding_window and not self.rolls
        self.ids = torch.zeros(batch, capacity if self.keeps_ids else 0, dtype=torch.long, device=device)
        self.counting = torch.arange(max(max_len, capacity), device=device).unsqueeze(0)  # (1, n): 0, 1, 2, ...
        self.mask: Tensor | None = None  # (batch, capacity) True at real tokens; None: no padding so far
        self.next_position = torch.zeros(batch, dtype=torch.long, device=device)
        self.source_mask: Tensor | None = None  # (batch, 1, 1, source) for cross-attention
        self.length = 0  # positions filled
        self.fed = 0  # columns fed since the last (re-)start: positions never reach it
        self.checked = False  # inputs are checked on the first call only

    # -- what the model asks ----------------------------------------------------------------------------------
    def key_mask(self) -> Tensor | None:
        """(batch, 1, 1, length): which cached positions are real tokens; None when all are."""
        return None if self.mask is None else self.mask[:, None, None, : self.length]  # built here: no checks

    def add(self, ids: Tensor, mask: Tensor | None) -> Tensor:
        """Record the new tokens ``ids`` (batch, t) and their mask (or None) → their positions (batch or 1, t).

        The caller made room first (:meth:`free`)."""
        t, start = ids.shape[1], self.length
        if self.keeps_ids:
            self.ids[:, start : start + t] = ids
        if mask is not None and self.mask is None:  # the first padding seen: every earlier column was real
            self.mask = torch.ones(self.batch, self.capacity, dtype=torch.bool, device=ids.device)
            self.next_position.fill_(self.fed)
        if self.mask is None:
            if self.fed + t <= self.counting.shape[1]:
                positions = self.counting[:, self.fed : self.fed + t]  # a view: cheaper than a new arange
            else:  # more than max_len tokens, in a window that rolls
                positions = torch.arange(self.fed, self.fed + t, device=ids.device).unsqueeze(0)
        else:
            real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask
            self.mask[:, start : start + t] = real
            counted = real.long().cumsum(-1)
            positions = (self.next_position[:, None] + counted - 1).clamp(min=0)  # padding: clamped, unused
            self.next_position += counted[:, -1]
        self.length += t
        self.fed += t
        return positions

    def free(self, n: int) -> bool:
        """Drop the ``n`` oldest positions of every row → whether a real token may have been among them.

        Raises ValueError when the state may not slide (``sliding_window=False``, or allocated for fewer than
        ``max_seq_len`` positions)."""
        if self.capacity < self.max_seq_len:
            raise ValueError(f"this decode state holds max_len={self.max_len} positions and {self.length} + "
                             f"{self.length + n - self.capacity} do not fit; create it with a larger max_len")
        if not self.sliding_window:
            raise ValueError(f"{self.length + n} positions do not fit the model's context max_seq_len="
                             f"{self.max_seq_len}, and the decode state was created with sliding_window=False; "
                             "generate fewer tokens, or pass sliding_window=True to keep the last "
                             f"{self.max_seq_len} tokens")
        # Only a re-encoding state needs to know (a device sync): were the dropped slots all padding?
        dropped_real = self.rolls or self.mask is None or bool(self.mask[:, :n].any())
        keep = self.length - n
        for t in (self.ids if self.keeps_ids else None, self.mask):
            if t is not None:
                t[:, :keep] = t[:, n : self.length].clone()
        for cache in self.caches:
            cache.drop_oldest(n)
        self.length = keep
        return dropped_real

    def window(self) -> tuple[Tensor, Tensor | None]:
        """The tokens held, (batch, length), and their mask, and empty the state (to re-encode them)."""
        ids = self.ids[:, : self.length].clone()
        mask = None if self.mask is None else self.mask[:, : self.length].clone()
        self.length, self.fed, self.mask = 0, 0, None
        self.next_position.zero_()
        for cache in self.caches:
            cache.length = 0
        return ids, mask

    # -- what a search may do between steps ------------------------------------------------------------------
    def reorder(self, index: Tensor, *, same_source: bool = False) -> None:
        """Keep rows ``index`` (a LongTensor of ``batch`` row numbers), in place: beam search's step.

        Every per-row tensor follows: the caches, ids, mask, positions, and the cross-attention keys/values and
        source mask of an encoder-decoder, unless ``same_source``: every row moves among rows decoding the same
        source (beam search's groups of num_beams rows), whose cross-attention inputs are the same, so copying
        them (the largest tensors of a translation step) would change nothing."""
        if index.shape != (self.batch,):
            raise ValueError(f"reorder needs one row index per row: shape ({self.batch},), got "
                             f"{tuple(index.shape)}")
        for cache in [*self.caches, *([] if same_source else self.cross_caches or [])]:
            cache.reorder(index)
        for t in (self.ids, self.mask, self.next_position, None if same_source else self.source_mask):
            if t is not None and t.numel():
                t.copy_(t.index_select(0, index))

    def __repr__(self) -> str:
        return (f"DecodeState(batch={self.batch}, length={self.length}/{self.capacity}, "
                f"sliding_window={self.sliding_window}, {'rolls' if self.rolls else 're-encodes'} past the context)")
