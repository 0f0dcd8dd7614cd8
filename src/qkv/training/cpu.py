"""CPU tuning: the cores this process may use, and the fastest (threads, precision) measured for a model shape."""

from __future__ import annotations

import os
import time

import torch

from ..config import ModelConfig
from ..losses import cross_entropy
from ..models import build_model, model_class_for
from .optimizer import adamw_kernel

__all__ = ["usable_cores", "fastest_cpu_settings"]


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask on Linux; all of them elsewhere)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def fastest_cpu_settings(model_config: ModelConfig, batch_size: int, context: int | None = None, *,
                         threads: tuple[int, ...] | None = None, dtypes: tuple[str, ...] = ("fp32", "bf16"),
                         seconds: float = 0.5) -> tuple[tuple[int, str], dict[tuple[int, str], float]]:
    """Time training steps of this model shape for each (threads, dtype) → (the fastest, {setting: tokens/s}).

    Measured, not guessed, because both answers depend on the machine and on what else runs on it. Threads: on a
    quiet machine every core helps; when another program holds a core, threads that wait for each other at every
    matrix multiply can make two threads several times slower than one. dtype: bf16 autocast multiplies 2-3x
    faster than fp32 on CPUs with bf16 instructions (AVX512_BF16, AMX) and about 2x slower on those without.
    A throwaway copy of the model trains on a random batch for about ``seconds`` per setting, in two interleaved
    rounds; torch's thread count is left at the fastest setting's.
    """
    threads = threads or tuple(sorted({1, usable_cores()}))
    context = context or model_config.max_seq_len
    generator = torch.Generator().manual_seed(0)
    model = build_model(model_config.replace(dropout=0.0), model_class_for(model_config).model_type).train()
    batch = torch.randint(0, model_config.vocab_size, (batch_size, context + 1), generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **adamw_kernel(torch.device("cpu")))

    def step(dtype: str) -> None:
        inputs = batch[:, :-1]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            out = model(inputs, inputs) if model.model_type == "seq2seq" else model(inputs)
            logits = model.logits(out) if model.model_type == "encoder" else out
            loss = cross_entropy(logits, batch[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    settings = [(n, dtype) for dtype in dtypes for n in threads]
    rates: dict[tuple[int, str], list[float]] = {setting: [] for setting in settings}
    for _ in range(2):
        for n, dtype in settings:
            torch.set_num_threads(n)
            step(dtype)  # warm-up at this setting
            steps, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < seconds / 2 or steps < 2:
                step(dtype)
                steps += 1
            rates[(n, dtype)].append(steps * batch_size * context / elapsed)
    best = {setting: max(r) for setting, r in rates.items()}
    fastest = max(best, key=best.get)
    torch.set_num_threads(fastest[0])
    return fastest, best
