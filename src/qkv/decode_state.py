"""``DecodeState``: what a model keeps between decoding steps, created by the model and passed back to it.

    state = model.new_decode_state(batch, max_len)
    logits = model(prompt_ids, attention_mask, decode_state=state)      # (batch, prompt, vocab)
    logits = model(next_ids, decode_state=state)                        # (batch, 1, vocab), and so on

It holds, in tensors allocated on the first call at a fixed shape and then written in place:

- one key/value cache per decoder layer, ``(batch, kv_heads, capacity, d_k)``;
- which column (the count of tokens fed before it) each cache slot holds, ``(capacity,)``;
- the token ids whose keys are cached, ``(batch, capacity)`` (to re-encode a window, below);
- the padding mask of those tokens (None while no token was padding), True at real tokens;
- each row's next position, counted from the row's first real token, so that a left-padded row sees the
  positions it would see alone;
- for an encoder-decoder, the cross-attention keys/values of the encoder output and the source mask.

**One graph for every step.** Keys and values are written at slot indices held in tensors, and everything that
changes from step to step (the column count, positions, the slots' columns) is a tensor too, so
``torch.compile(fullgraph=True)`` of a decoding step traces it once (and once more for the prompt, whose length
differs). Eagerly, a step attends to the slots filled so far (and needs no mask at all while nothing is
padding); compiled, it attends to the whole cache with a mask that hides the slots not yet written.

**Past the context** (more than ``max_seq_len`` tokens) the state slides a window of the last ``max_seq_len``
tokens, unless it was created with ``sliding_window=False`` (then the step is refused). How depends on the
positional encoding:

- relative or no positions (``rope``, ``alibi``, ``none``): the cache is a ring: the new token's keys and values
  overwrite the oldest slot and positions keep counting. Scores depend on position differences only, so each
  new token attends to the last ``max_seq_len`` tokens exactly as a forward pass over the whole sequence with a
  *sliding-window* causal mask would (Mistral's sliding-window attention); compiled, it is still the same graph.
  It is not a fresh forward pass over the window: keys of a deeper layer still carry what their token saw before
  older tokens left the window.
- absolute positions (``sinusoidal``, ``learned``): a position the model never saw has no meaning, so the window
  is re-encoded from position 0 whenever a real token must leave it: each such step equals a forward pass
  without cache over the most recent ``max_seq_len`` tokens (and costs one). Deciding when needs the count on
  the host, so a compiled step refuses a state that may have to re-encode (decode such a model eagerly past its
  context, or give it a state of fewer than max_seq_len positions).

Dropping only padding (the oldest slots of a left-padded row) changes nothing, so it never re-encodes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .attention import KVCache
from .errors import OptionError

__all__ = ["DecodeState", "ROLLING_POSITIONALS", "UNWRITTEN"]

# Positional encodings whose cache may roll: attention scores depend only on position differences (or on
# nothing), so keys computed at earlier positions stay valid as the window slides.
ROLLING_POSITIONALS = ("rope", "alibi", "none")

UNWRITTEN = 2**62  # the column of a slot that holds no token yet: after every query's column


class DecodeState:
    """Per-row decoding state of one batch (see the module docstring). Create it with
    ``model.new_decode_state(batch, max_len)``; only the model reads and writes it.

    ``capacity`` = min(max_len, max_seq_len) slots are allocated. ``length`` is how many hold a token (read by
    eager steps; a compiled step keeps its counts in tensors only).
    """

    def __init__(self, *, batch: int, capacity: int, max_len: int, max_seq_len: int, positional: str,
                 sliding_window: bool, caches: list[KVCache], cross_caches: list[KVCache] | None):
        self.batch, self.capacity, self.max_len, self.max_seq_len = batch, capacity, max_len, max_seq_len
        self.sliding_window = sliding_window
        self.rolls = positional in ROLLING_POSITIONALS
        slides = sliding_window and capacity >= max_seq_len  # a smaller state refuses instead (see free())
        self.ring = slides and self.rolls  # the cache is a ring: the newest token overwrites the oldest slot
        self.keeps_ids = slides and not self.rolls  # the ids are kept to re-encode a window
        # RoPE's table holds max_seq_len positions; a ring keeps counting past them (no bound).
        self.position_limit = UNWRITTEN if self.ring else None
        self.caches, self.cross_caches = caches, cross_caches
        self.source_mask: Tensor | None = None  # (batch, 1, 1, source) for cross-attention
        self.mask: Tensor | None = None  # (batch, capacity) True at real tokens; None: no padding so far
        self.checked = False  # inputs are checked on the first call only
        # Tensors, allocated on the first call on the device of the ids (see allocate()).
        # (1,) tokens fed since the last (re-)start: the next token's column, and its slot (modulo the capacity
        # in a ring; a window that re-encodes renumbers its columns when it drops its oldest)
        self.column: Tensor | None = None
        self.slot_column: Tensor | None = None  # (capacity,) the column each slot holds; UNWRITTEN when none
        self.next_position: Tensor | None = None  # (batch,) each row's next position, once padding was seen
        self.ids: Tensor | None = None  # (batch, capacity) the ids held, when a window may be re-encoded
        self.offsets: Tensor | None = None  # (capacity,) 0, 1, 2, ...
        # Host counts, kept by eager steps (a compiled step leaves them stale; the next eager step re-reads them).
        self.length = 0  # slots that hold a token
        self.fed = 0  # tokens fed since the last (re-)start
        self.synced = True
        self.restarted = False  # a window was re-encoded: the first tokens are gone

    def allocate(self, device: torch.device) -> None:
        """Create the per-step tensors (the first call does, on the device of its ids)."""
        self.column = torch.zeros(1, dtype=torch.long, device=device)
        self.offsets = torch.arange(self.capacity, device=device)
        self.slot_column = torch.full((self.capacity,), UNWRITTEN, dtype=torch.long, device=device)
        self.next_position = torch.zeros(self.batch, dtype=torch.long, device=device)
        if self.keeps_ids:
            self.ids = torch.zeros(self.batch, self.capacity, dtype=torch.long, device=device)

    # -- what the model asks ----------------------------------------------------------------------------------
    def sync(self) -> None:
        """Re-read the host counts after compiled steps (an eager step calls this first; one read per step at
        most, none while every step is eager)."""
        if not self.synced:
            self.fed = int(self.column)
            self.length = min(self.fed, self.capacity)
            self.synced = True

    def add(self, ids: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Record the new tokens ``ids`` (batch, t) and their mask (or None) → (their positions (batch or 1, t),
        the slots they are written to (t,), their columns (t,)).

        The caller made room first (:meth:`free`)."""
        t = ids.shape[1]
        if self.column is None:
            self.allocate(ids.device)
        columns = self.column.clone() if t == 1 else self.column + self.offsets[:t]
        slots = columns % self.capacity if self.ring else columns
        self.slot_column.index_copy_(0, slots, columns)
        if self.keeps_ids:
            self.ids.index_copy_(1, slots, ids)
        if mask is not None and self.mask is None:  # the first padding seen: every earlier column was real
            self.mask = torch.ones(self.batch, self.capacity, dtype=torch.bool, device=ids.device)
            self.next_position.copy_(self.column)
        if self.mask is None:
            positions = columns.unsqueeze(0)  # (1, t): every row counts from its first token, column 0
        else:
            real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask
            self.mask.index_copy_(1, slots, real)
            counted = real.long().cumsum(-1)
            positions = (self.next_position[:, None] + counted - 1).clamp(min=0)  # padding: clamped, unused
            self.next_position += counted[:, -1]
        self.column += t
        if torch.compiler.is_compiling():
            self.synced = False  # a constant store: the graph does not depend on the counts
        else:
            self.fed += t
            self.length = min(self.length + t, self.capacity)
        return positions, slots, columns

    def attention_view(self, columns: Tensor) -> tuple[Tensor | None, bool, int | None]:
        """What the new tokens (at ``columns`` (t,)) attend to → (mask, causal, n_keys): the first ``n_keys``
        slots (all when None), whose columns are ``slot_column[:n_keys]``.

        Eagerly: the ``length`` slots held, in order until a ring wraps; ``causal`` for several new tokens; a
        mask only where padding was seen. Compiled: every slot, with a mask that hides the slots not yet written
        and those after each query (one shape for every step)."""
        if torch.compiler.is_compiling():
            visible = (self.slot_column[None, :] <= columns[:, None])[None, None]  # (1, 1, t, capacity)
            mask = visible if self.mask is None else visible & self.mask[:, None, None, :]
            return mask, False, None
        n = self.length
        mask = None if self.mask is None else self.mask[:, None, None, :n]  # built here: no checks
        # A ring that wrapped takes one token at a time (the model splits), which may see every slot held.
        return mask, columns.shape[0] > 1, n

    def free(self, n: int) -> bool:
        """Drop the ``n`` oldest positions of every row (a state that re-encodes: absolute positions) → whether a
        real token may have been among them. Eager steps only.

        Raises ValueError when the state may not slide (``sliding_window=False``, or allocated for fewer than
        ``max_seq_len`` positions)."""
        if self.capacity < self.max_seq_len:
            raise ValueError(f"this decode state holds max_len={self.max_len} positions and {self.length} + "
                             f"{self.length + n - self.capacity} do not fit; create it with a larger max_len")
        if not self.sliding_window:
            raise OptionError(f"{self.length + n} positions do not fit the model's context max_seq_len="
                              f"{self.max_seq_len}, and the decode state was created with {{sliding_window:False}}; "
                              "generate fewer tokens, or slide a window ({sliding_window:True}) to keep the last "
                              f"{self.max_seq_len} tokens")
        # Only a re-encoding state needs to know (a device sync): were the dropped slots all padding?
        dropped_real = self.mask is None or bool(self.mask[:, :n].any())
        keep, length = self.length - n, self.length
        for t in (self.ids, self.mask):
            if t is not None:
                t[:, :keep] = t[:, n:length].clone()
        for cache in self.caches:
            cache.drop_oldest(n, length)
        self.slot_column[:keep] = self.slot_column[n:length] - n  # columns renumbered: slot == column again
        self.slot_column[keep:] = UNWRITTEN
        self.column -= n
        self.length, self.fed = keep, self.fed - n
        return dropped_real

    def window(self) -> tuple[Tensor, Tensor | None]:
        """The tokens held, (batch, length), and their mask, and empty the state (to re-encode them)."""
        ids = self.ids[:, : self.length].clone()
        mask = None if self.mask is None else self.mask[:, : self.length].clone()
        self.length, self.fed, self.mask = 0, 0, None
        self.restarted = True  # its columns count from the window's start, no longer from the first token
        for t in (self.column, self.next_position):
            t.zero_()
        self.slot_column.fill_(UNWRITTEN)
        return ids, mask

    def rewind(self, n: int) -> None:
        """Forget every token after the first ``n`` fed, in place, so the next call continues at position ``n``:
        a conversation that resends its history reuses the keys and values of the prefix it shares with the last
        request and feeds only what follows (as llama.cpp's server reuses its prompt cache). Eager only.

        Raises ValueError when ``n`` is not in [0, tokens fed], or when the first tokens are no longer held (the
        window slid past the context): start a new state then."""
        self.sync()
        if not isinstance(n, int) or not 0 <= n <= self.fed:
            raise ValueError(f"rewind needs 0 <= n <= {self.fed} (the tokens fed), got {n!r}")
        if self.fed > self.length or self.restarted:
            raise ValueError("this decode state slid its window past the context, so its first tokens are gone; "
                             "create a new one and feed the whole sequence")
        if n == self.fed:
            return
        self.column.fill_(n)
        self.slot_column[n:] = UNWRITTEN
        if self.mask is not None:
            self.next_position.copy_(self.mask[:, :n].sum(-1))
        self.length = self.fed = n

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
        how = "a ring" if self.ring else ("re-encodes" if self.keeps_ids else "stays within its capacity")
        return (f"DecodeState(batch={self.batch}, length={self.length}/{self.capacity}, "
                f"sliding_window={self.sliding_window}, {how} past the context)")
