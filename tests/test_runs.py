"""Runs that lose nothing: one trainer per run directory, resume from whatever a kill leaves, data found from any
directory, a translation run evaluated as one, a full disk named with what was kept.

Kills are exact, never timed: ``QKV_FAULT=<point>[@N]`` makes a `qkv train` process exit at once (``os._exit``,
as SIGKILL would) the N-th time it reaches a named point. Each such process is `qkv train` (``qkv.cli.main``) in a
forked child: a separate process that really dies, without paying Python's and torch's start-up again.
"""

import csv
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import sys
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_cli import TINY, _cache_and_threads, run_cli  # noqa: F401 (an autouse fixture)

from qkv.checkpoint import FAULT_EXIT_STATUS, LATEST, claim_run_directory, save_run_checkpoint
from qkv.cli import main
from qkv.data import read_corpus
from qkv.train import evaluate_checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints"

# a checkpoint at every step, a metrics row at every second one: a kill can fall between any two of them
STEPS = 4
FAULT_RUN = [*TINY, "--max-steps", STEPS, "--save-every", 1, "--log-every", 2, "--eval-every", 2,
             "--keep-checkpoints", STEPS]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text(read_corpus().text[:20_000])
    return path


@pytest.fixture(scope="module")
def never_killed(corpus_file, tmp_path_factory):
    """The final weights of the fault runs' settings, trained without interruption."""
    out = tmp_path_factory.mktemp("reference") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QKV_CACHE_DIR", str(out.parent / "cache"))
        threads = torch.get_num_threads()
        assert main([str(a) for a in ["train", "--data", corpus_file, "--out", out, *FAULT_RUN]]) == 0
        torch.set_num_threads(threads)
    return final_weights(out)


def final_weights(run) -> dict:
    return load_file(run / (run / LATEST).read_text().strip() / "model.safetensors")


def fork_qkv(args, *, env=None, max_file_bytes=None):
    """Start `qkv ARGS` in a forked child, its stdout and stderr into one pipe → (pid, the pipe's reading end).

    ``max_file_bytes``: the child may write no file larger than this (RLIMIT_FSIZE; SIGXFSZ ignored, so a write
    past it fails with EFBIG, as one on a full disk fails with ENOSPC)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(read_fd)
            os.dup2(write_fd, 1)
            os.dup2(write_fd, 2)
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
            os.environ.update(env or {})
            if max_file_bytes is not None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))
            code = main([str(a) for a in args])
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(write_fd)
    return pid, os.fdopen(read_fd)


def wait(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def logged_steps(run) -> list[int]:
    return [int(row["step"]) for row in csv.DictReader((run / "metrics.csv").open())]


# -- 11: one trainer per run directory ----------------------------------------------------------------------------
def test_a_run_still_training_is_refused_naming_its_process_and_a_killed_ones_lock_is_taken_over(
        corpus_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(capsys, "train", "--data", corpus_file, "--out", out, "--max-steps", 1, *TINY)[0] == 0
    pid, output = fork_qkv(["train", "--resume", out, "--max-steps", 100_000, "--eval-every", 100_000,
                            "--save-every", 0])
    try:
        seen = []
        for line in output:  # wait for the resumed run's first step, never a fixed sleep
            seen.append(line)
            if line.startswith("step 2:"):
                break
        assert seen and seen[-1].startswith("step 2:"), "".join(seen)
        before = {p.relative_to(out): p.read_bytes() for p in out.rglob("step-*/*")}
        holder = f"process {pid} on {socket.gethostname()}"
        for args in (["--resume", out, "--max-steps", 3],
                     ["--data", corpus_file, "--out", out, "--overwrite", "--max-steps", 1, *TINY]):
            code, _, err = run_cli(capsys, "train", *args)
            assert code == 2 and err.count("\n") == 1 and holder in err and "in use" in err, err
        assert {p.relative_to(out): p.read_bytes() for p in out.rglob("step-*/*")} == before
    finally:
        os.kill(pid, signal.SIGKILL)  # its lock stays behind, held by no one
        output.close()
    assert wait(pid) == -signal.SIGKILL
    code, stdout, err = run_cli(capsys, "train", "--resume", out, "--max-steps", 3, "--no-progress")
    assert code == 0, err
    assert "done: step 3," in stdout


# -- issue 18 item 1: nothing written where no run belongs ------------------------------------------------------
def listing(folder) -> dict:
    """Every file and folder under ``folder`` (hidden ones too), with each file's bytes."""
    return {p.relative_to(folder): p.read_bytes() if p.is_file() else "dir" for p in sorted(folder.rglob("*"))}


def test_a_path_that_is_not_a_run_is_refused_in_one_line_by_every_command_and_left_byte_identical(
        corpus_file, tmp_path, capsys, monkeypatch):
    from qkv import ModelConfig
    from qkv.recipes import resume, train

    home = tmp_path / "etc"  # as /etc: a directory of someone's files
    (home / "ssh").mkdir(parents=True)
    (home / "hosts").write_text("127.0.0.1 localhost\n")
    (home / "ssh" / "config").write_text("Host *\n")
    (home / "run.txt").write_text("not a run\n")
    elsewhere = tmp_path / "downloads"  # a checkpoint copied out of its run: its run would write beside it
    shutil.copytree(FIXTURES / "decoder" / "run" / "step-000012", elsewhere / "checkpoint")
    before = listing(tmp_path)
    not_a_run = f"not a qkv training run: no trainer_state.json, latest or step-* checkpoint in {home}; --resume"
    for args, expected in [
        (["train", "--resume", home, "--max-steps", 5], not_a_run),
        (["train", "--resume", home / "ssh", "--max-steps", 5], "not a qkv training run"),
        (["train", "--resume", home, "--out", tmp_path / "new", "--max-steps", 5], not_a_run),
        (["train", "--resume", FIXTURES / "decoder" / "run", "--out", home], f"{home} holds other files"),
        (["train", "--resume", home / "hosts"], f"{home / 'hosts'} is a file, not a qkv training run; --resume takes"),
        (["train", "--resume", elsewhere / "checkpoint", "--max-steps", 13], "checkpoint outside a run directory"),
        (["train", "--data", corpus_file, "--out", home, *TINY], f"{home} holds other files and no qkv training run"),
        (["train", "--data", corpus_file, "--out", home, "--overwrite", *TINY], "holds other files"),
        (["train", "--data", corpus_file, "--out", home / "hosts", *TINY], "is a file; --out takes a directory"),
        (["eval", "--checkpoint", home], "is missing config.json"),
    ]:
        code, _, err = run_cli(capsys, *args)
        assert code == 2 and err.count("\n") == 1 and expected in err, (args, err)
        assert listing(tmp_path) == before, args
    config = ModelConfig.preset("tiny-decoder", d_model=32, n_heads=2, d_ff=64, max_seq_len=32)
    for call in (lambda: resume(home), lambda: resume(elsewhere / "checkpoint"),
                 lambda: train("language-model", config, data=corpus_file, out_dir=home),
                 lambda: train("language-model", config, data=corpus_file, out_dir=home / "hosts")):
        with pytest.raises((ValueError, OSError), match="not a qkv training run|checkpoint outside|holds other|a file"):
            call()
        assert listing(tmp_path) == before


def test_a_run_holds_its_lock_file_only_while_it_runs(tmp_path):
    run, empty = tmp_path / "run", tmp_path / "empty"
    empty.mkdir()
    for directory in (run, empty):  # a directory a new run creates, and an empty one it finds
        with claim_run_directory(directory):
            assert (directory / ".lock").is_file() and (directory / ".lock-owner").is_file()
            (directory / "step-000001").mkdir()
        assert sorted(p.name for p in directory.iterdir()) == ["step-000001"]  # no lock left behind
        with claim_run_directory(directory, resuming=True):
            assert (directory / ".lock").is_file()
        assert sorted(p.name for p in directory.iterdir()) == ["step-000001"]


# -- issue 18 item 4: the data a run trained on is the data it is judged on ----------------------------------------
@pytest.mark.parametrize("preset", ["tiny-decoder", "tiny-encoder"])
def test_resume_and_eval_refuse_a_text_that_grew_by_a_line_saying_what_changed_and_how_to_go_on(
        preset, corpus_file, tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_bytes(corpus_file.read_bytes())
    out = tmp_path / "run"
    sizes = [("--n-encoder-layers" if a == "--n-decoder-layers" and preset == "tiny-encoder" else a) for a in TINY]
    assert run_cli(capsys, "train", preset, "--data", data, "--out", out, "--max-steps", 1, *sizes)[0] == 0
    then = data.read_bytes()
    with data.open("a") as f:
        f.write("one more line\n")
    now = data.read_bytes()
    changed = (f"{data} changed since this run trained on it (recorded: {len(then):,} bytes, sha256 "
               f"{hashlib.sha256(then).hexdigest()[:12]}; now: {len(now):,} bytes, sha256 "
               f"{hashlib.sha256(now).hexdigest()[:12]}); ")
    code, _, err = run_cli(capsys, "train", "--resume", out, "--max-steps", 2)
    assert code == 2 and err.count("\n") == 1 and changed + "resuming needs the text it trained on" in err, err
    assert err.count(str(data)) == 1  # the path once, not "X differs from ... (X)"
    code, _, err = run_cli(capsys, "eval", "--checkpoint", out, "--threads", 1)
    assert code == 2 and err.count("\n") == 1 and changed in err and f"pass --data {data} to evaluate" in err, err
    code, stdout, err = run_cli(capsys, "eval", "--checkpoint", out, "--data", data, "--threads", 1)
    assert code == 0 and stdout.startswith("loss ") and str(data) in stdout, err  # on purpose: evaluated


# -- 12, 14: resume from whatever a kill leaves -------------------------------------------------------------------
@pytest.mark.parametrize("fault", ["metrics:before-row@1", "save:mid@2", "save:before-rename@2",
                                   "save:after-rename@1", "save:after-rename@2", "save:before-rename@1"])
def test_a_run_killed_at_any_point_continues_and_ends_as_if_never_killed(fault, corpus_file, never_killed,
                                                                         tmp_path, capsys):
    out = tmp_path / "run"
    first = ["train", "--data", corpus_file, "--out", out, *FAULT_RUN]
    pid, output = fork_qkv(first, env={"QKV_FAULT": fault})
    said = output.read()
    assert wait(pid) == FAULT_EXIT_STATUS, said
    if fault == "save:before-rename@1":  # killed before its first checkpoint: nothing to resume, start again
        code, _, err = run_cli(capsys, "train", "--resume", out, "--no-progress")
        assert code == 2 and err.count("\n") == 1 and "no checkpoint yet" in err, err
        code, stdout, err = run_cli(capsys, *first)
    else:
        code, stdout, err = run_cli(capsys, "train", "--resume", out, "--max-steps", STEPS, "--no-progress",
                                    "--threads", 1)  # as the other runs: sums over 2 threads round differently
    assert code == 0, err
    assert f"done: step {STEPS}," in stdout
    weights = final_weights(out)
    assert weights.keys() == never_killed.keys()
    assert all(torch.equal(weights[k], never_killed[k]) for k in weights)
    assert logged_steps(out) == [2, 4]  # each logged step once, whatever was logged before the kill
    assert sorted(p.name for p in out.iterdir() if p.name.endswith((".tmp", ".old"))) == []


def test_claiming_a_run_directory_puts_back_a_checkpoint_set_aside_and_deletes_unfinished_files(tmp_path):
    from qkv import ModelConfig
    from qkv.models import build_model
    from qkv.tokenizers import Tokenizer

    tok = Tokenizer.char("to be or not to be")
    model = build_model(ModelConfig.preset("tiny-decoder", vocab_size=tok.vocab_size, d_model=32, d_ff=64))
    run = tmp_path / "run"
    save_run_checkpoint(run, 1, model, tok)
    saved = {p.name: p.read_bytes() for p in (run / "step-000001").iterdir()}
    # what a kill leaves between "set the old checkpoint aside" and "rename the new one in", mid-save
    os.replace(run / "step-000001", run / ".step-000001.old")
    (run / ".step-000001.0a1b2c.tmp").mkdir()
    (run / ".step-000001.0a1b2c.tmp" / "model.safetensors").write_bytes(b"half")
    (run / ".latest.3d4e5f.tmp").write_text("step-0000")
    with claim_run_directory(run, resuming=True):
        assert {p.name: p.read_bytes() for p in (run / "step-000001").iterdir()} == saved
        assert sorted(p.name for p in run.iterdir()) == [".lock", ".lock-owner", "latest", "step-000001"]
        owner = json.loads((run / ".lock-owner").read_text())
        assert (owner["pid"], owner["host"]) == (os.getpid(), socket.gethostname())
    assert not (run / ".lock-owner").exists()


# -- 13: the data is found from any directory ---------------------------------------------------------------------
def test_resume_and_eval_find_the_data_from_another_directory(corpus_file, tmp_path, monkeypatch, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "small.txt").write_bytes(corpus_file.read_bytes())
    monkeypatch.chdir(tmp_path / "a")
    assert run_cli(capsys, "train", "--data", "small.txt", "--out", "run", "--max-steps", 1, *TINY)[0] == 0
    run = json.loads((tmp_path / "a" / "run" / "step-000001" / "trainer_state.json").read_text())["run"]
    data = tmp_path / "a" / "small.txt"
    assert run["data"] == str(data.resolve())
    assert run["data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    monkeypatch.chdir(tmp_path / "b")
    code, stdout, err = run_cli(capsys, "train", "--resume", "../a/run", "--max-steps", 2, "--no-progress")
    assert code == 0 and "done: step 2," in stdout, err
    code, stdout, err = run_cli(capsys, "eval", "--checkpoint", "../a/run", "--threads", 1)
    assert code == 0 and stdout.startswith("loss ") and str(data.resolve()) in stdout, err


# -- 15: a translation run is evaluated as one --------------------------------------------------------------------
def test_eval_of_a_translation_run_reports_its_validation_loss_without_bleu(tmp_path, capsys):
    pairs = [f"the cat number {i} sleeps\tle chat numéro {i} dort" for i in range(120)]
    data = tmp_path / "pairs.tsv"
    data.write_text("\n".join(pairs) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "tiny-seq2seq", "--data", data, "--out", out, "--max-steps", 2,
                           "--test-size", 10, "--valid-size", 10, "--batch-tokens", 256, "--label-smoothing", 0,
                           "--eval-batches", 1000, "--no-progress", "--threads", 1)
    assert code == 0, err
    code, stdout, err = run_cli(capsys, "eval", "--checkpoint", out)
    assert code == 0 and stdout.startswith("loss ") and err == "", err
    # the trainer's last evaluation covered every validation pair, without label smoothing: the same loss
    history = json.loads((out / "step-000002" / "trainer_state.json").read_text())["history"]
    result = evaluate_checkpoint(out)
    assert result["loss"] == pytest.approx(history[-1]["val_loss"], rel=1e-5)
    assert f"loss {result['loss']:.4f} nats/token" in stdout and str(data.resolve()) in stdout


# -- 16: a full disk ----------------------------------------------------------------------------------------------
def test_a_save_that_cannot_write_names_the_checkpoint_kept_in_one_line(corpus_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(capsys, "train", "--data", corpus_file, "--out", out, "--max-steps", 1, *TINY)[0] == 0
    kept = out / "step-000001"
    sizes = sorted(p.stat().st_size for p in kept.iterdir())
    # room for every file but the largest (the optimizer's moments): the save fails part-way, as on a full disk
    pid, output = fork_qkv(["train", "--resume", out, "--max-steps", 2, "--no-progress"],
                           max_file_bytes=(sizes[-2] + sizes[-1]) // 2)
    said = output.read()
    assert wait(pid) == 1, said
    message = said.splitlines()[-1]
    assert said.count("Traceback") == 0 and message.startswith("qkv train: error: could not save checkpoint")
    assert str(out / "step-000002") in message and f"kept as it was at {kept}" in message
    assert f"--resume {out}" in message
    assert (out / LATEST).read_text().strip() == "step-000001"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("step-")) == ["step-000001"]
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []
