"""Synthetic sequence tasks for quick checks of any sequence-to-sequence change.

Vocabulary layout shared by every task: 0 = <pad>, 1 = <bos>, 2 = <eos>, symbols from 3 upward.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["PAD", "BOS", "EOS", "FIRST_SYMBOL", "PLUS", "copy_task", "reverse_task", "sort_task", "addition_task",
           "TASKS", "exact_match"]

PAD, BOS, EOS, FIRST_SYMBOL = 0, 1, 2, 3
PLUS = FIRST_SYMBOL + 10  # addition: digits 0-9 are FIRST_SYMBOL + d, then "+"


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


def _framed(body: Tensor) -> Tensor:
    """(n, L) target symbols → <bos> body <eos>, (n, L + 2)."""
    n = body.shape[0]
    return torch.cat([torch.full((n, 1), BOS), body, torch.full((n, 1), EOS)], dim=1)


def reverse_task(n: int, length: int, vocab_size: int, *, generator: torch.Generator | None = None,
                 ) -> tuple[Tensor, Tensor]:
    """Source x_1..x_L, target <bos> x_L..x_1 <eos>: every output attends to a different input position."""
    src, _ = copy_task(n, length, vocab_size, generator=generator)
    return src, _framed(src.flip(1))


def sort_task(n: int, length: int, vocab_size: int, *, generator: torch.Generator | None = None,
              ) -> tuple[Tensor, Tensor]:
    """Source x_1..x_L, target <bos> sorted(x) <eos> (ascending symbol ids)."""
    src, _ = copy_task(n, length, vocab_size, generator=generator)
    return src, _framed(src.sort(dim=1).values)


def addition_task(n: int, digits: int, vocab_size: int = FIRST_SYMBOL + 11, *,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Source "a+b" with a, b of ``digits`` digits (leading zeros), target <bos> a + b <eos> in digits + 1 digits.

    Symbols: digit d is FIRST_SYMBOL + d, "+" is PLUS; ``vocab_size`` must hold them (>= 14).
    """
    if vocab_size < PLUS + 1:
        raise ValueError(f"vocab_size={vocab_size} cannot hold the 10 digits and '+' after <pad>, <bos>, <eos>; "
                         f"use >= {PLUS + 1}")
    if digits < 1:
        raise ValueError(f"digits={digits} must be >= 1")
    high = 10 ** digits
    a = torch.randint(0, high, (n,), generator=generator)
    b = torch.randint(0, high, (n,), generator=generator)

    def to_digits(x: Tensor, width: int) -> Tensor:  # most significant digit first
        powers = 10 ** torch.arange(width - 1, -1, -1)
        return (x.unsqueeze(1) // powers) % 10 + FIRST_SYMBOL

    src = torch.cat([to_digits(a, digits), torch.full((n, 1), PLUS), to_digits(b, digits)], dim=1)
    return src, _framed(to_digits(a + b, digits + 1))


# name → generator with the signature (n, size, vocab_size, *, generator) → (src, tgt)
TASKS = {"copy": copy_task, "reverse": reverse_task, "sort": sort_task, "addition": addition_task}


def exact_match(predicted: Tensor, target: Tensor) -> float:
    """Fraction of rows where the predicted sequence equals the target at every position."""
    if predicted.shape != target.shape:
        raise ValueError(f"predicted {tuple(predicted.shape)} and target {tuple(target.shape)} differ in shape")
    return float((predicted == target).all(dim=1).float().mean())
