"""`qkv bench --quick` runs and prints its tables; the benchmark's bookkeeping is right. No timed tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from qkv.bench.attention import growth_exponent
from qkv.bench.training import BenchShape, build_hf_gpt2, build_qkv, build_x_transformers, model_flops_per_token


def test_qkv_bench_quick_prints_every_table():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run([sys.executable, "-m", "qkv", "bench", "--quick"], capture_output=True, text=True,
                          env=env, timeout=110, check=False)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    rows = {}
    for library in ("qkv", "HF GPT-2", "x-transformers"):
        row = rf"^\s+quick\s+2/2/32/16/2\s+{re.escape(library)}\s+([\d,]+)\s+([\d,]+)\s+(\d+)\s+([\d.]+)%"
        match = re.search(row, out, re.M)
        assert match, f"no training row for {library} in:\n{out}"
        rows[library] = float(match.group(2).replace(",", ""))
        assert rows[library] > 0
    ratio = re.search(r"/HF GPT-2 ([\d.]+)", out)
    assert ratio and float(ratio.group(1)) == pytest.approx(rows["qkv"] / rows["HF GPT-2"], rel=0.05, abs=0.01)
    for length in (64, 128):
        assert re.search(rf"^\s+{length}\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+$", out, re.M), out
    assert "Generation" in out


def test_qkv_and_gpt2_have_the_same_parameters_for_the_flop_count():
    """The comparison is like for like: qkv's GPT-2-layout model has exactly Hugging Face GPT-2's N."""
    shape = BenchShape("t", layers=2, heads=2, d_model=32, context=16, batch=1)
    (_, n_qkv), (_, n_hf), (_, n_x) = build_qkv(shape), build_hf_gpt2(shape), build_x_transformers(shape)
    d, L, V = 32, 2, 65  # per layer: 4d² + 4d (attention) + 8d² + 5d (feed-forward) + 4d (two norms)
    assert n_qkv == n_hf == L * (12 * d * d + 13 * d) + V * d + 2 * d
    assert abs(n_x - n_qkv) < 0.05 * n_qkv  # no biases in its attention: slightly fewer
    assert model_flops_per_token(n_qkv, L, d, 16) == 6 * n_qkv + 12 * L * d * 16


@pytest.mark.parametrize("p", [1, 2])
def test_growth_exponent_sees_through_a_constant(p):
    rows = [{"length": t, "mb": 7.0 + 0.001 * t**p} for t in (1024, 2048, 4096, 8192)]
    assert growth_exponent(rows, "mb") == pytest.approx(p)
    assert growth_exponent(rows[:2], "mb") is None


def test_bf16_option_trains_every_contender_under_cpu_autocast():
    """--bf16: the step's matrix multiplies run in bf16 (weights and optimizer stay fp32); the table says so."""
    from qkv.bench.training import QUICK_SHAPE, make_optimizer, training_step

    model, _ = build_qkv(QUICK_SHAPE)
    seen = []
    model.layers.layers[0].ffn.w1.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    ids = torch.randint(0, 65, (QUICK_SHAPE.batch, QUICK_SHAPE.context + 1))
    optimizer = make_optimizer(model)
    for bf16 in (None, True):
        training_step(model, optimizer, ids[:, :-1], ids[:, 1:], bf16)
    assert seen == [torch.float32, torch.bfloat16]
    assert all(p.dtype == torch.float32 for p in model.parameters())

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run([sys.executable, "-m", "qkv", "bench", "training", "--quick", "--bf16"],
                          capture_output=True, text=True, env=env, timeout=110, check=False)
    assert done.returncode == 0, done.stderr
    assert "bf16 autocast" in done.stdout and "bf16 torch.mm" in done.stdout


def test_paired_ratio_range_compares_within_each_round():
    """The range is over the ratios round by round (rates[i] / other[i]), whatever each side's overall spread."""
    from qkv.bench.training import paired_ratio_range

    assert paired_ratio_range([20.0, 10.0, 30.0], [16.0, 8.0, 20.0]) == pytest.approx((1.25, 1.5))
    with pytest.raises(ValueError):
        paired_ratio_range([1.0, 2.0], [1.0])


def test_qkv_bench_generate_runs_only_the_sections_asked_for(capsys):
    from qkv.cli import main

    assert main(["bench", "generate", "--quick", "--only", "small", "--threads", "1", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "small (4x128)" in out and "KV cache" not in out and "without the KV cache" not in out
    assert main(["bench", "training", "--only", "smollm2"]) == 2
    assert "add the word generate" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_weight_reading_limit_reads_every_byte_and_its_products_are_the_product(dtype):
    """Each way the limit may time reads the whole matrix: the products (W @ x, F.linear and the prepacked one the
    compiled step uses, where this torch has it) agree with one another, and the plain read finds the largest
    int32 among the weights' bytes, so none of them can be fast by reading less."""
    from qkv.bench.generation import _read_ways, weight_reader

    torch.manual_seed(0)
    ways = _read_ways(64 * 48, 48, dtype)
    with torch.inference_mode():
        products = {name: way().reshape(-1).float() for name, way in ways.items() if name != "read (no product)"}
        largest = ways["read (no product)"]()
    assert len(products) >= 2
    reference = products["F.linear"]
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    for product in products.values():
        torch.testing.assert_close(product, reference, atol=tolerance * reference.abs().max().item(), rtol=0)
    torch.manual_seed(0)
    w = torch.randn(64, 48).to(dtype)
    assert largest.item() == w.view(-1).view(torch.int32).max().item()
    name, read = weight_reader(64 * 48, 48, dtype, repeats=1)
    assert name in ways and read() is not None
