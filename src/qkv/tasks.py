"""Synthetic sequence tasks for quick checks of any sequence-to-sequence change.

Vocabulary layout shared by every task: 0 = <pad>, 1 = <bos>, 2 = <eos>, symbols from 3 upward.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["PAD", "BOS", "EOS", "FIRST_SYMBOL", "copy_task"]

PAD, BOS, EOS, FIRST_SYMBOL = 0, 1, 2, 3


def copy_task(n: int, length: int, vocab_size: int, *, generator: torch.Generator | None = None,
              ) -> tuple[Tensor, Tensor]:
    """Random sequences to reproduce: source x_1..x_L, target <bos> x_1..x_L <eos>.

    Returns ``(src (n, L), tgt (n, L + 2))``. Teacher forcing feeds ``tgt[:, :-1]`` and predicts ``tgt[:, 1:]``.
    """
    if vocab_size <= FIRST_SYMBOL:
        raise ValueError(f"vocab_size={vocab_size} leaves no symbols after <pad>, <bos>, <eos>; use >= 4")
    src = torch.randint(FIRST_SYMBOL, vocab_size, (n, length), generator=generator)
    bos = torch.full((n, 1), BOS)
    eos = torch.full((n, 1), EOS)
    return src, torch.cat([bos, src, eos], dim=1)
