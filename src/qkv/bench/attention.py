"""Attention memory and time against sequence length: the explicit formula against the fused kernel.

The explicit path materialises the (T, T) scores, mask and weights, so its memory grows as T²; the fused path
(``F.scaled_dot_product_attention``, causal without a mask) works through blocks of keys and keeps only
(T, d_k)-sized tensors, so its memory grows as T. Each (path, length) runs in a fresh subprocess, whose peak
resident memory (VmHWM, or ``ru_maxrss``) above its peak before the call is the attention's peak memory.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

__all__ = ["ATTENTION_LENGTHS", "QUICK_LENGTHS", "measure_attention", "attention_benchmark",
           "format_attention_table"]

ATTENTION_LENGTHS = (256, 512, 1024, 2048, 4096, 8192)
QUICK_LENGTHS = (64, 128)
PATHS = ("explicit", "fused")
HEADS, D_K = 2, 64  # two heads keep the explicit path at 8192 tokens under 2 GB


def _peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MB.

    Linux: VmHWM of this process image (``ru_maxrss`` would carry over the parent's peak from before exec);
    elsewhere ``ru_maxrss`` (KB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024


def measure_attention(path: str, length: int, repeats: int = 5) -> dict:
    """Causal self-attention over ``length`` tokens (batch 1, 2 heads, d_k 64), forward only, in this process.

    → {"peak_mb": resident-memory peak of the first call above the peak before it (one-off set-up costs are
    paid by a 16-token call first), "ms": median time of ``repeats`` further calls}. The memory figure means
    something only in a fresh process (see ``attention_benchmark``).
    """
    from qkv.attention import scaled_dot_product_attention

    if path not in PATHS:
        raise ValueError(f"unknown attention path {path!r}; choose one of {', '.join(PATHS)}")
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, length, D_K, generator=generator) for _ in range(3))
    need_weights = path == "explicit"

    def attend() -> None:
        scaled_dot_product_attention(q, k, v, causal=True, need_weights=need_weights)

    with torch.no_grad():
        small = torch.randn(1, HEADS, 16, D_K, generator=generator)
        scaled_dot_product_attention(small, small, small, causal=True, need_weights=need_weights)  # one-off costs
        before = _peak_rss_mb()
        attend()
        peak = _peak_rss_mb() - before
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            attend()
            times.append(time.perf_counter() - start)
    return {"path": path, "length": length, "peak_mb": peak, "ms": statistics.median(times) * 1e3}


def _in_subprocess(path: str, length: int, repeats: int) -> dict:
    code = ("import json, sys, torch; from qkv.bench.attention import measure_attention; "
            f"torch.set_num_threads({torch.get_num_threads()}); "
            f"print(json.dumps(measure_attention({path!r}, {length}, {repeats})))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"attention benchmark at {length} tokens ({path}) failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def attention_benchmark(*, quick: bool = False, lengths: tuple[int, ...] | None = None,
                        repeats: int = 5) -> list[dict]:
    """One row per length: explicit and fused peak memory (MB) and time (ms), one fresh subprocess each."""
    lengths = lengths or (QUICK_LENGTHS if quick else ATTENTION_LENGTHS)
    repeats = 1 if quick else repeats
    rows = []
    for length in lengths:
        row: dict = {"length": length}
        for path in PATHS:
            result = _in_subprocess(path, length, repeats)
            row[f"{path}_mb"], row[f"{path}_ms"] = result["peak_mb"], result["ms"]
        rows.append(row)
    return rows


def growth_exponent(rows: list[dict], key: str) -> float | None:
    """p in memory = c + a·T^p from the last three lengths, each twice the one before: the increments grow by
    2^p per doubling (p = 1: linear, p = 2: quadratic), whatever the constant c. None when unmeasurable."""
    if len(rows) < 3 or any(b["length"] != 2 * a["length"] for a, b in zip(rows[-3:-1], rows[-2:], strict=True)):
        return None
    first, second = rows[-2][key] - rows[-3][key], rows[-1][key] - rows[-2][key]
    if first <= 0 or second <= 0:
        return None
    return math.log2(second / first)


def format_attention_table(rows: list[dict]) -> str:
    """The rows as a plain-text table, with the growth exponent of each path's memory."""
    if not rows:
        return ""
    lines = [f"Attention vs sequence length (causal, batch 1, {HEADS} heads, d_k {D_K}, forward; peak memory "
             "above the process's earlier peak, one subprocess each)",
             f"  {'tokens':>7} {'explicit MB':>12} {'fused MB':>10} {'explicit ms':>12} {'fused ms':>10}"]
    for r in rows:
        lines.append(f"  {r['length']:>7} {r['explicit_mb']:>12.1f} {r['fused_mb']:>10.1f} "
                     f"{r['explicit_ms']:>12.2f} {r['fused_ms']:>10.2f}")
    exponents = []
    for path in PATHS:
        p = growth_exponent(rows, f"{path}_mb")
        exponents.append(f"{path} p = {p:.2f}" if p is not None else f"{path} p n/a")
    lines.append(f"  memory = c + a·T^p over the three longest lengths: {', '.join(exponents)}")
    return "\n".join(lines)
