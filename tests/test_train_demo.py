"""The demo's quick mode (the full 180-second demo never runs inside the test suite)."""

import torch

import qkv
from qkv import demo


def test_demo_quick_mode_trains_samples_and_draws(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    try:
        assert demo.main(["--time-budget", "2", "--threads", "1", "--sample-length", "80", "--final-eval-batches", "2",
                          "--out", str(tmp_path / "demo")]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "validation loss" in out and "sample (temperature 0.8" in out
    sample = out.split("-" * 60)[1].strip("\n")
    assert sample.startswith("ROMEO:") and len(sample) == len("ROMEO:\n") + 80
    for picture in ("loss.png", "attention.png"):
        assert (tmp_path / "demo" / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model, tokenizer = qkv.load(tmp_path / "demo")
    assert tokenizer.vocab_size == 65 and model.config == demo.DEMO_MODEL
