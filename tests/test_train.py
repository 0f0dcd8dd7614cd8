"""The trainer: schedules, weight-decay groups, the MLM recipe, exact resume, learning beyond letter counts."""

import collections
import csv
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from qkv import ModelConfig
from qkv.data import read_corpus
from qkv.models import DecoderLM
from qkv.tokenizers import Tokenizer
from qkv.train import (
    IGNORE_INDEX,
    MaskedLM,
    TrainConfig,
    evaluate_checkpoint,
    noam_lr,
    param_groups,
    resume,
    train,
    warmup_cosine,
)

SMALL = read_corpus().text[:30_000]


@pytest.fixture(autouse=True)
def _token_cache_in_tmp(tmp_path, monkeypatch, one_thread):
    """Token files in tmp_path; one torch thread, so tiny models do not fight other tests for the CPU."""
    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def small_text(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text(SMALL)
    return path


def unigram_entropy(text: str) -> float:
    """H = -Σ_c p(c) log p(c), in nats: the loss of a model that knows only letter frequencies."""
    counts = collections.Counter(text)
    return -sum(n / len(text) * math.log(n / len(text)) for n in counts.values())


def tiny(model_type="decoder", **overrides) -> ModelConfig:
    layers = {"n_decoder_layers": 1, "n_encoder_layers": 0} if model_type == "decoder" else {
        "n_decoder_layers": 0, "n_encoder_layers": 1}
    return ModelConfig(**{"vocab_size": 65, "d_model": 48, "n_heads": 2, "d_ff": 96, "max_seq_len": 32,
                          **layers, **overrides})


QUIET = dict(progress=False, eval_batches=8)


# -- schedules ------------------------------------------------------------------------------------------------------
def test_noam_schedule_is_the_papers_formula_peaking_at_warmup():
    d_model, warmup = 512, 4000
    for step in (1, 100, 3999, 4000, 4001, 100_000):
        assert noam_lr(step, d_model, warmup) == pytest.approx(
            d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5))
    peak = max(range(1, 20_000, 7), key=lambda s: noam_lr(s, d_model, warmup))
    assert abs(peak - warmup) <= 7


def test_warmup_then_cosine_rises_linearly_and_decays_to_the_floor():
    assert [warmup_cosine(s, 0.0, warmup=4, min_ratio=0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine(10, 0.5, warmup=4, min_ratio=0.1) == pytest.approx(0.55)
    assert warmup_cosine(10, 1.0, warmup=4, min_ratio=0.1) == pytest.approx(0.1)


def test_weight_decay_spares_norms_biases_and_embeddings():
    model = DecoderLM(tiny(tie_embeddings=False))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert all(n.endswith(".weight") and "norm" not in n and not n.startswith("embed") for n in decayed)
    assert "lm_head.weight" in decayed and "embed.token.weight" not in decayed


# -- masked language modelling -------------------------------------------------------------------------------------
def test_mlm_corruption_follows_berts_15_80_10_10_recipe():
    tok = Tokenizer.char("abcdefghij", special_tokens=["<mask>"])
    ids = torch.randint(0, 10, (200, 500))
    inputs, targets = MaskedLM(tok, TrainConfig()).corrupt(ids, torch.Generator().manual_seed(0))
    chosen = targets != IGNORE_INDEX
    assert chosen.float().mean().item() == pytest.approx(0.15, abs=0.005)
    assert torch.equal(targets[chosen], ids[chosen]) and torch.equal(inputs[~chosen], ids[~chosen])
    masked = (inputs[chosen] == tok.mask_id).float().mean().item()
    kept = (inputs[chosen] == ids[chosen]).float().mean().item()
    assert masked == pytest.approx(0.8, abs=0.01)
    assert kept == pytest.approx(0.1 + 0.1 / tok.vocab_size, abs=0.01)  # 10% kept, plus random draws that hit


# -- end to end ----------------------------------------------------------------------------------------------------
def test_decoder_learns_more_than_letter_frequencies(small_text, tmp_path):
    result = train(tiny("decoder"), TrainConfig(max_steps=150, batch_size=16, lr=3e-3, warmup_steps=10,
                                                eval_every=150, **QUIET),
                   data=small_text, out_dir=tmp_path / "run", print_fn=lambda _: None)
    assert result.val_loss < unigram_entropy(SMALL) - 0.4
    # qkv eval on the same checkpoint and the same windows reproduces the trainer's validation loss
    evaluated = evaluate_checkpoint(result.checkpoint, batch_size=16)
    assert evaluated["data"] == str(small_text)
    assert evaluated["loss"] < unigram_entropy(SMALL) - 0.4


def test_encoder_learns_masked_tokens_beyond_letter_frequencies(small_text, tmp_path):
    result = train(tiny("encoder", d_model=64, d_ff=128, n_heads=4),
                   TrainConfig(max_steps=500, batch_size=32, lr=3e-3, warmup_steps=10, eval_every=500, **QUIET),
                   data=small_text, out_dir=tmp_path / "run", print_fn=lambda _: None)
    assert result.val_loss < unigram_entropy(SMALL) - 0.1


@pytest.mark.parametrize("model_type", ["decoder", "encoder"])
def test_a_label_smoothed_run_reports_the_validation_loss_qkv_eval_gives(model_type, small_text, tmp_path):
    """Label smoothing belongs to the training objective: the validation loss a run returns, prints and logs is
    plain cross-entropy, the number `qkv eval` gives for the same checkpoint and windows (a masked LM: with the
    masks the trainer drew, from the run's own seed and mask rate), and the training loss says it is smoothed."""
    said: list[str] = []
    result = train(tiny(model_type), TrainConfig(max_steps=2, batch_size=8, label_smoothing=0.1, eval_every=2,
                                                 mlm_probability=0.3, seed=5, final_eval_batches=100, **QUIET),
                   data=small_text, out_dir=tmp_path / "run", print_fn=said.append)
    evaluated = evaluate_checkpoint(result.checkpoint, batch_size=8)  # the trainer's windows, batched alike
    assert result.val_loss == pytest.approx(evaluated["loss"], rel=1e-6)
    row = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))[-1]
    assert float(row["val_loss"]) == pytest.approx(evaluated["loss"], rel=1e-6)
    assert float(row["val_ppl"]) == pytest.approx(math.exp(evaluated["loss"]), rel=1e-6)
    assert row["label_smoothing"] == "0.1"
    line = next(m for m in said if m.startswith("step      2 |"))
    assert "(label-smoothed 0.1) | val" in line and f"val {evaluated['loss']:.4f}" in line


def test_a_metrics_file_written_before_the_label_smoothing_column_continues_on_resume(small_text, tmp_path):
    options = dict(batch_size=4, log_every=1, eval_every=2, **QUIET)
    train(tiny("decoder"), TrainConfig(max_steps=2, **options), data=small_text, out_dir=tmp_path / "run",
          print_fn=lambda _: None)
    metrics = tmp_path / "run" / "metrics.csv"
    old = [",".join(line.split(",")[:-1]) for line in metrics.read_text().splitlines()]  # without the new column
    metrics.write_text("\r\n".join(old) + "\r\n")
    resume(tmp_path / "run", {"max_steps": 3}, print_fn=lambda _: None)
    rows = list(csv.DictReader(metrics.open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert [r["label_smoothing"] for r in rows] == ["", "", "0.0"]


def test_bpe_run_trains_and_saves_its_tokenizer(small_text, tmp_path):
    result = train(tiny("decoder", vocab_size=300), TrainConfig(max_steps=3, batch_size=4, **QUIET),
                   data=small_text, out_dir=tmp_path / "run", tokenizer="bpe", print_fn=lambda _: None)
    tok = Tokenizer.load(result.checkpoint)
    assert tok.kind == "bpe" and tok.vocab_size == 300


# -- exact resume --------------------------------------------------------------------------------------------------
def test_resume_reaches_bit_identical_weights(small_text, tmp_path):
    """Stopped at step 6 and resumed, a run at step 12 equals the uninterrupted one, bit for bit (with dropout)."""
    model = tiny("decoder", dropout=0.1, n_decoder_layers=2)
    options = dict(batch_size=8, lr=3e-3, warmup_steps=3, grad_accum=2, eval_every=4, save_every=4,
                   keep_checkpoints=5, **QUIET)
    straight = train(model, TrainConfig(max_steps=12, **options), data=small_text, out_dir=tmp_path / "a",
                     print_fn=lambda _: None)
    train(model, TrainConfig(max_steps=12, **options), data=small_text, out_dir=tmp_path / "b",
          print_fn=lambda _: None)
    # the same run, cut at step 6: keep only the checkpoint of step 4, as if the process died at step 6
    for late in ("step-000008", "step-000012"):
        shutil.rmtree(tmp_path / "b" / late)
    (tmp_path / "b" / "latest").write_text("step-000004\n")
    resumed = resume(tmp_path / "b", print_fn=lambda _: None)
    assert resumed.step == straight.step == 12
    a, b = load_file(straight.checkpoint / "model.safetensors"), load_file(resumed.checkpoint / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.val_loss == straight.val_loss


def test_trainer_applies_the_noam_schedule_under_bf16_autocast_on_cpu(small_text, tmp_path):
    result = train(tiny("decoder"), TrainConfig(max_steps=3, batch_size=4, schedule="noam", warmup_steps=2,
                                                dtype="bf16", log_every=1, **QUIET),
                   data=small_text, out_dir=tmp_path / "run", print_fn=lambda _: None)
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert [float(r["lr"]) for r in rows] == pytest.approx([noam_lr(s, 48, 2) for s in (1, 2, 3)])
    assert math.isfinite(result.val_loss)


def learning_rates(run_dir) -> dict[int, float]:
    """step → lr, from metrics.csv (the last row of a step, should one have been logged twice)."""
    return {int(r["step"]): float(r["lr"]) for r in csv.DictReader((run_dir / "metrics.csv").open())}


def test_continuing_a_finished_cosine_run_stays_at_its_final_learning_rate(small_text, tmp_path):
    """A cosine schedule ends where the run set out to end: resumed with a larger max_steps, a finished run takes
    its extra steps at the lr of its last step (it used to re-derive the cosine for the new end, a 3x jump up), and a
    run stopped half-way follows the curve it started on, then stays at the same final lr."""
    options = dict(batch_size=4, lr=3e-3, warmup_steps=2, log_every=1, eval_every=3, save_every=3,
                   keep_checkpoints=5, **QUIET)
    for name in ("finished", "stopped"):
        train(tiny("decoder"), TrainConfig(max_steps=6, **options), data=small_text, out_dir=tmp_path / name,
              print_fn=lambda _: None)
    planned = learning_rates(tmp_path / "finished")
    assert planned[6] < planned[3] < planned[2]  # warm-up to step 2, then the decay
    resume(tmp_path / "finished", {"max_steps": 9}, print_fn=lambda _: None)
    continued = learning_rates(tmp_path / "finished")
    assert [continued[s] for s in (7, 8, 9)] == [planned[6]] * 3

    shutil.rmtree(tmp_path / "stopped" / "step-000006")  # as if it had stopped at step 3, then continued to 9
    (tmp_path / "stopped" / "latest").write_text("step-000003\n")
    resume(tmp_path / "stopped", {"max_steps": 9}, print_fn=lambda _: None)
    stopped = learning_rates(tmp_path / "stopped")
    assert [stopped[s] for s in range(1, 10)] == [planned[s] for s in range(1, 7)] + [planned[6]] * 3


def test_resuming_a_finished_run_without_more_steps_says_so_and_rewrites_nothing(small_text, tmp_path):
    """It used to print 'validation loss nan' and save its last checkpoint again; a missing run directory was
    created by the claim and then said to hold 'no checkpoint yet'."""
    train(tiny("decoder"), TrainConfig(max_steps=3, batch_size=4, eval_every=3, **QUIET), data=small_text,
          out_dir=tmp_path / "run", print_fn=lambda _: None)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "step-000003").iterdir()}
    with pytest.raises(ValueError, match=r"already finished at step 3 \(validation loss \d+\.\d{4}\); .*--max-steps"):
        resume(tmp_path / "run", print_fn=lambda _: None)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "step-000003").iterdir()} == before
    with pytest.raises(FileNotFoundError, match="nope does not exist; --resume takes a run directory"):
        resume(tmp_path / "nope", print_fn=lambda _: None)
    assert not (tmp_path / "nope").exists()


def test_a_run_shorter_than_its_warmup_says_it_never_reaches_its_learning_rate(small_text, tmp_path):
    """--max-steps 20 with the default 100 warm-up steps trains at a tenth of lr at most, silently before."""
    said: list[str] = []
    train(tiny("decoder"), TrainConfig(max_steps=2, warmup_steps=5, batch_size=4, **QUIET), data=small_text,
          out_dir=tmp_path / "short", print_fn=said.append)
    assert any("warmup_steps=5 >= max_steps=2" in line and "--warmup-steps" in line for line in said)
    said.clear()
    train(tiny("decoder"), TrainConfig(max_steps=2, warmup_steps=1, batch_size=4, **QUIET), data=small_text,
          out_dir=tmp_path / "fine", print_fn=said.append)
    assert not any("warmup_steps" in line for line in said)
