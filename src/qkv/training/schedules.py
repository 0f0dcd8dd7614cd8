"""Learning-rate schedules: each formula has one home, and ``learning_rate`` picks the run's."""

from __future__ import annotations

import math

from .options import TrainConfig

__all__ = ["warmup_cosine", "noam_lr", "learning_rate"]


def warmup_cosine(step: int, progress: float, *, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak lr: (step+1)/warmup while warming up, then min + (1-min)·½(1 + cos(π·progress))."""
    if step < warmup:
        return (step + 1) / warmup
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def noam_lr(step: int, d_model: int, warmup: int) -> float:
    """lr = d_model^-0.5 · min(step^-0.5, step · warmup^-1.5) ("Attention Is All You Need", eq. 3), step >= 1."""
    step = max(step, 1)
    return d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)


def learning_rate(config: TrainConfig, step: int, progress: float, *, d_model: int, last_ratio: float) -> float:
    """The learning rate of step ``step`` (counted from 0) at ``progress`` (0 → 1) along the schedule.

    A cosine schedule ends where the run set out to end. A run continued beyond it (``--resume`` with a larger
    ``--max-steps`` or ``--time-budget``) runs the extra steps at ``last_ratio`` · peak, the finished schedule's
    final learning rate; a fresh schedule belongs to a new run. The noam and constant schedules are defined at
    every step and simply go on."""
    if config.schedule == "noam":
        return config.peak_lr * noam_lr(step + 1, d_model, config.warmup_steps)
    if config.schedule == "constant":
        return config.peak_lr
    if progress >= 1.0:
        return config.peak_lr * last_ratio
    return config.peak_lr * warmup_cosine(step, progress, warmup=config.warmup_steps, min_ratio=config.min_lr_ratio)
