"""Padding a batch of token-id lists: decoder prompts on the left, encoder inputs and targets on the right."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["left_pad", "right_pad"]



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
