"""`qkv train` / `qkv eval` from the command line: interruption, divergence, TOML options, bad input."""

import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import qkv
from qkv.cli import main
from qkv.data import read_corpus

TINY = ["--d-model", "32", "--n-heads", "2", "--d-ff", "64", "--n-decoder-layers", "1", "--max-seq-len", "32",
        "--batch-size", "4", "--eval-batches", "2", "--no-progress", "--threads", "1"]


@pytest.fixture(autouse=True)
def _cache_and_threads(tmp_path, monkeypatch):
    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def small_text(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text(read_corpus().text[:20_000])
    return path


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_sigint_saves_a_loadable_checkpoint_and_the_run_resumes(small_text, tmp_path, capsys):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qkv", "train", "--data", small_text, "--out", out, "--max-steps", "100000",
         "--eval-every", "100000", *TINY], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "QKV_CACHE_DIR": str(tmp_path / "cache")})
    seen = []
    for line in proc.stdout:  # wait for the first step, never a fixed sleep
        seen.append(line)
        if line.startswith("step 1:"):
            break
    assert seen and seen[-1].startswith("step 1:"), "".join(seen) + proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "SIGINT at step" in stderr and "saved checkpoint" in stderr and f"--resume {out}" in stderr
    model, tok = qkv.load(out)
    stopped = int((out / "latest").read_text().strip().split("-")[1])
    assert stopped >= 1 and model.config.d_model == 32 and tok.vocab_size > 30
    code, stdout, err = run_cli(capsys, "train", "--resume", out, "--max-steps", stopped + 2, "--no-progress")
    assert code == 0, err
    assert f"resuming {out / f'step-{stopped:06d}'} at step {stopped}" in stdout
    assert f"done: step {stopped + 2}," in stdout


def test_divergence_stops_names_the_step_and_keeps_the_last_good_checkpoint(small_text, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", small_text, "--out", out, "--max-steps", 4, *TINY)
    assert code == 0, err
    good = out / "step-000004"
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    code, _, err = run_cli(capsys, "train", "--resume", out, "--lr", "1e30", "--max-steps", 50, "--save-every",
                           1000, "--no-progress")
    assert code == 3
    message = err.strip()
    assert "\n" not in message, repr(err)
    assert "diverged" in message and "at step 6" in message  # warm-up: the lr reaches 1e28 only at step 5
    assert str(good) in message and "learning rate too high" in message
    assert "attention scale" in message and "fp16" in message
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert (out / "latest").read_text().strip() == "step-000004"
    assert all(torch.isfinite(t).all() for t in load_file(good / "model.safetensors").values())


def test_toml_options_apply_and_flags_override_them(small_text, tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(f'data = "{small_text}"\nmax_steps = 2\n[model]\nd_model = 32\nn_heads = 2\n'
                      f'd_ff = 64\nn_decoder_layers = 1\nmax_seq_len = 16\n[train]\nbatch_size = 2\n')
    code, out, err = run_cli(capsys, "train", "--config", config, "--out", tmp_path / "run", "--max-steps", 3,
                             "--no-progress", "--threads", 1)
    assert code == 0, err
    assert "done: step 3," in out
    peak = float(re.search(r"peak memory ([0-9.]+) GB", out).group(1))  # this process's, tests and torch included
    assert 0.1 < peak < 24
    model, _ = qkv.load(tmp_path / "run")
    assert (model.config.d_model, model.config.max_seq_len) == (32, 16)
    code, out, err = run_cli(capsys, "eval", "--checkpoint", tmp_path / "run", "--threads", 1)
    assert code == 0 and out.startswith("loss ") and "perplexity" in out


@pytest.mark.parametrize(("make", "args", "expected"), [
    (None, ["--data", "{tmp}/missing.txt"], "does not exist"),
    ("", ["--data", "{tmp}/data.txt"], "is empty"),
    ("to be or not", ["--data", "{tmp}/data.txt"], "shorter than one context window"),
    (None, ["--vocab-size", "300"], "character tokenizer takes its vocabulary from the text"),
    (None, ["--resume", "{tmp}/run", "--d-model", "64"], "--d-model cannot change"),
    (None, ["--dtype", "fp16"], "fp16 is not offered"),
    ("x = 1\n", ["--config", "{tmp}/data.txt"], "unknown option 'x'"),
    ("d_modle = 1\n", ["--config", "{tmp}/data.txt"], "did you mean 'd_model'"),
])
def test_bad_input_is_one_clear_line_and_exit_status_2(tmp_path, capsys, make, args, expected):
    if make is not None:
        (tmp_path / "data.txt").write_text(make)
    args = [a.format(tmp=tmp_path) for a in args]
    code, _, err = run_cli(capsys, "train", *args, "--out", tmp_path / "new", "--no-progress", "--max-steps", 1)
    assert code == 2
    assert err.count("\n") == 1 and expected in err, err


def test_an_existing_run_is_never_overwritten_by_a_new_one(small_text, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(capsys, "train", "--data", small_text, "--out", out, "--max-steps", 1, *TINY)[0] == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, _, err = run_cli(capsys, "train", "--data", small_text, "--out", out, "--max-steps", 1, *TINY)
    assert code == 2 and "already holds a training run" in err and f"--resume {out}" in err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_eval_names_characters_the_vocabulary_lacks(small_text, tmp_path, capsys):
    assert run_cli(capsys, "train", "--data", small_text, "--out", tmp_path / "run", "--max-steps", 1, *TINY)[0] == 0
    (tmp_path / "other.txt").write_text("héllo wörld ✓ " * 50)
    code, _, err = run_cli(capsys, "eval", "--checkpoint", tmp_path / "run", "--data", tmp_path / "other.txt")
    assert code == 2 and err.count("\n") == 1 and "lacks: 'é', 'ö', '✓'" in err


def test_eval_refuses_a_pickle_and_a_checkpoint_missing_files(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"w": torch.zeros(2)}, bad / "pytorch_model.bin")
    code, _, err = run_cli(capsys, "eval", "--checkpoint", bad)
    assert code == 2 and err.count("\n") == 1 and "pickled weights" in err
    (bad / "config.json").write_text('{"format": "qkv"}')
    code, _, err = run_cli(capsys, "eval", "--checkpoint", bad)
    assert code == 2 and "pickled weights" in err
    (bad / "pytorch_model.bin").unlink()
    code, _, err = run_cli(capsys, "eval", "--checkpoint", bad)
    assert code == 2 and "missing model.safetensors, tokenizer.json" in err


def test_tiny_seq2seq_translates_a_parallel_file_without_naming_a_vocabulary_size(tmp_path, capsys):
    """The preset's 32 symbols suit the synthetic tasks; on a parallel file its shared BPE gets the default size."""
    pairs = [f"the cat number {i} sleeps\tle chat numéro {i} dort" for i in range(120)]
    data = tmp_path / "pairs.tsv"
    data.write_text("\n".join(pairs) + "\n", encoding="utf-8")
    code, out, err = run_cli(capsys, "train", "tiny-seq2seq", "--data", data, "--out", tmp_path / "run",
                             "--max-steps", "2", "--test-size", "10", "--valid-size", "10", "--batch-tokens", "256",
                             "--eval-batches", "1", "--no-progress", "--threads", "1")
    assert code == 0, err
    model, tokenizer = qkv.load(tmp_path / "run")
    assert model.config.vocab_size == tokenizer.vocab_size > 256  # every byte, then merges learned from the pairs


def test_threads_in_a_toml_file_sets_torch_threads_and_a_bad_count_is_named(small_text, tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(f'data = "{small_text}"\nthreads = 1\nmax_steps = 1\n[model]\nd_model = 32\nn_heads = 2\n'
                      f'd_ff = 64\nn_decoder_layers = 1\nmax_seq_len = 16\n[train]\nbatch_size = 2\n')
    torch.set_num_threads(2)
    code, out, err = run_cli(capsys, "train", "--config", config, "--out", tmp_path / "run", "--no-progress")
    assert code == 0 and "done: step 1," in out, err
    assert torch.get_num_threads() == 1
    for value in ("0", '"two"'):
        config.write_text(f"threads = {value}\n")
        code, _, err = run_cli(capsys, "train", "--config", config, "--out", tmp_path / "other")
        assert code == 2 and err.count("\n") == 1 and "threads" in err and "positive whole number" in err, err


def test_help_shows_the_allowed_values_of_every_choice_field(capsys):
    from qkv.config import ACTIVATIONS, NORM_POSITIONS
    from qkv.train import SCHEDULES

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the usage lines
    assert "--positional {sinusoidal,learned,none,rope,alibi}" in text
    assert f"--norm-position {{{','.join(NORM_POSITIONS)}}}" in text
    assert f"--schedule {{{','.join(SCHEDULES)}}}" in text and f"--activation {{{','.join(ACTIVATIONS)}}}" in text
    assert "--dtype {auto,fp32,bf16}" in text and "--parallel {ddp,fsdp}" in text


def test_without_matplotlib_training_names_no_loss_curve_it_did_not_draw(small_text, tmp_path, capsys,
                                                                          monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails, as when not installed
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "train", "--data", small_text, "--out", out, "--max-steps", 1, *TINY)
    assert code == 0, err
    assert not (out / "loss.png").exists() and "loss.png" not in stdout
    assert "no loss curve (it needs matplotlib: pip install 'qkv[viz]')" in stdout
