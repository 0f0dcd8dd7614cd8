"""The demo's quick mode (the full 180-second demo never runs inside the test suite)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qkv
from qkv import demo


def test_demo_quick_mode_trains_samples_and_draws(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    try:
        assert demo.main(["--time-budget", "2", "--threads", "1", "--dtype", "bf16", "--sample-length", "80",
                          "--final-eval-batches", "2", "--out", str(tmp_path / "demo")]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "validation loss" in out and "sample (temperature 0.8" in out
    assert "1 CPU thread(s), bf16 autocast" in out
    trained = float(re.search(r"at +[\d.]+ s +([\d.]+) +\(final", out).group(1))
    in_fp32 = float(re.search(r"evaluated in fp32: ([\d.]+)", out).group(1))
    assert abs(trained - in_fp32) < 0.05  # the same weights: bf16 autocast only rounds the products
    sample = out.split("-" * 60)[1].strip("\n")
    assert sample.startswith("ROMEO:") and len(sample) == len("ROMEO:\n") + 80
    for picture in ("loss.png", "attention.png"):
        assert (tmp_path / "demo" / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model, tokenizer = qkv.load(tmp_path / "demo")
    assert tokenizer.vocab_size == 65 and model.config == demo.DEMO_MODEL
    assert f"more: {demo.qkv_command()} generate --checkpoint {tmp_path / 'demo'} 'ROMEO:'" in out


def test_the_qkv_command_the_demo_prints_runs_as_typed_whether_or_not_the_venv_is_on_path(monkeypatch):
    """``make demo`` runs .venv/bin/python without activating the venv: a bare ``qkv`` would not be found."""
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    venv_bin = str(Path(sys.executable).parent)
    bare = os.pathsep.join(p for p in os.environ.get("PATH", os.defpath).split(os.pathsep) if p != venv_bin)
    for path in (bare, f"{venv_bin}{os.pathsep}{bare}"):
        monkeypatch.setenv("PATH", path)
        typed = f"{demo.qkv_command()} --version"
        done = subprocess.run(typed, shell=True, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stdout.startswith("qkv "), (path, typed, done.stderr)


def test_fastest_cpu_settings_measures_every_setting_and_leaves_torch_at_the_one_it_picked():
    from qkv.train import fastest_cpu_settings

    threads = torch.get_num_threads()
    try:
        for config in (demo.DEMO_MODEL.replace(n_decoder_layers=1, d_model=32, n_heads=2, d_ff=64),
                       qkv.ModelConfig.preset("tiny-encoder"), qkv.ModelConfig.preset("tiny-seq2seq")):
            fastest, rates = fastest_cpu_settings(config, 2, 16, threads=(1, 2), seconds=0.05)
            assert set(rates) == {(1, "fp32"), (2, "fp32"), (1, "bf16"), (2, "bf16")}
            assert all(rate > 0 for rate in rates.values())
            assert fastest in rates and torch.get_num_threads() == fastest[0]
    finally:
        torch.set_num_threads(threads)


def test_fastest_cpu_settings_times_the_model_it_is_given_a_250x_larger_one_trains_fewer_tokens_per_s():
    """The rates are timings of this model's training steps: a model 16x wider and 2x deeper (250x the parameters;
    about 12x slower per token here) trains at under a third of the small one's tokens/s in the same setting, a
    margin no load on a shared machine reverses."""
    from qkv.train import fastest_cpu_settings

    threads = torch.get_num_threads()
    small = qkv.ModelConfig.preset("tiny-decoder", d_model=16, n_heads=2, d_ff=64, n_decoder_layers=1)
    large = small.replace(d_model=256, d_ff=1024, n_decoder_layers=2)
    try:
        small_rate, large_rate = (fastest_cpu_settings(c, 2, 16, threads=(1,), dtypes=("fp32",), seconds=0.1)
                                  [1][(1, "fp32")] for c in (small, large))
    finally:
        torch.set_num_threads(threads)
    assert large_rate < small_rate / 3, (small_rate, large_rate)


def test_demo_refuses_a_bad_thread_count(capsys):
    for bad in ("0", "two", "-1"):
        with pytest.raises(SystemExit) as exit_info:
            demo.main(["--threads", bad])
        assert exit_info.value.code != 0
        assert "is not a thread count" in capsys.readouterr().err
