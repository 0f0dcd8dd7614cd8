"""The trainer's callbacks and the recipes on top of it: hooks in order however a run ends, a trainer without
callbacks that writes nothing but checkpoints, train(recipe)/resume(path) dispatching on the recorded recipe, the
one data-unchanged check refusing a run's data once it changed, `qkv train` reaching every recipe (a new one too)
through the table alone, and qkv.train's old names keeping their meaning with a deprecation."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import warnings
import zipfile

import pytest
from test_train import SMALL, _token_cache_in_tmp, small_text  # noqa: F401 (fixtures: the token cache, a text)

from qkv import ModelConfig
from qkv.checkpoint import read_run_info
from qkv.data import Corpus, WindowBatches, load_tokens
from qkv.evaluation import evaluate_checkpoint
from qkv.models import DecoderLM
from qkv.recipes import RECIPES, Option, RunOptions, recipe_chosen_by, resume, train
from qkv.recipes.translation import held_out_test_split, train_translation, translation_train_config
from qkv.tokenizers import Tokenizer
from qkv.training import (
    OBJECTIVES,
    Callback,
    StopOnSignal,
    TrainConfig,
    Trainer,
    TrainingInterrupted,
    TrainResult,
    mean_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(d_model=32, n_heads=2, d_ff=64, max_seq_len=32)
QUIET = dict(batch_size=4, eval_batches=1, progress=False, device="cpu")


class Recorder(Callback):
    """Every hook call, with the step the trainer was at."""

    def __init__(self):
        self.events = []

    def start(self, trainer):
        self.events.append(("start", trainer.step))

    def log(self, trainer, row):
        self.events.append(("log", row["step"]))

    def finish(self, trainer):
        self.events.append(("finish", trainer.step))

    def end(self, trainer):
        self.events.append(("end", trainer.step))


def tiny_trainer(tmp_path, callbacks, **options) -> Trainer:
    tok = Tokenizer.char(SMALL)
    model = DecoderLM(ModelConfig.preset("tiny-decoder", vocab_size=tok.vocab_size, n_decoder_layers=1, **TINY))
    tokens = load_tokens(Corpus(SMALL, "small"), tok)
    train_windows = WindowBatches(tokens.train, 33, 4, name="train")
    val_windows = WindowBatches(tokens.val, 33, 4, name="validation")
    config = TrainConfig(**{**QUIET, "eval_every": 100, **options})
    return Trainer(model, tok, train_windows, val_windows, config, tmp_path / "run", callbacks=callbacks,
                   print_fn=lambda _: None)


def test_callbacks_see_start_each_logged_row_finish_and_end_in_order(tmp_path):
    recorder = Recorder()
    trainer = tiny_trainer(tmp_path, [recorder], max_steps=4, log_every=2)
    result = trainer.fit()
    assert recorder.events == [("start", 0), ("log", 2), ("log", 4), ("finish", 4), ("end", 4)]
    # without the default callbacks the trainer writes its checkpoint and nothing else: no metrics, no picture
    assert result.checkpoint.is_dir() and result.loss_curve is None
    assert not (tmp_path / "run" / "metrics.csv").exists() and not (tmp_path / "run" / "loss.png").exists()


def test_a_signal_stops_the_run_after_its_step_and_every_callback_finishes_but_none_ends(tmp_path):
    class SendSigint(Callback):
        def log(self, trainer, row):
            os.kill(os.getpid(), signal.SIGINT)  # as a Ctrl-C arriving while step 2 is being logged

    before = signal.getsignal(signal.SIGINT)
    recorder = Recorder()
    trainer = tiny_trainer(tmp_path, [StopOnSignal(), SendSigint(), recorder], max_steps=10, log_every=2)
    with pytest.raises(TrainingInterrupted, match="SIGINT at step 2") as stopped:
        trainer.fit()
    assert recorder.events == [("start", 0), ("log", 2), ("finish", 2)]
    assert stopped.value.checkpoint.name == "step-000002"
    assert signal.getsignal(signal.SIGINT) is before  # StopOnSignal put the handler back


def test_train_and_resume_dispatch_on_the_recipe_the_run_records(small_text, tmp_path):  # noqa: F811
    config = ModelConfig.preset("tiny-encoder", n_encoder_layers=1, **TINY)
    result = train("masked-lm", config, TrainConfig(max_steps=1, **QUIET), data=small_text, out_dir=tmp_path / "run",
                   print_fn=lambda _: None)
    run = read_run_info(result.checkpoint)
    assert run["recipe"] == "masked-lm" and run["model_type"] == "encoder"
    messages = []
    resumed = resume(tmp_path / "run", {"max_steps": 2}, print_fn=messages.append)
    assert resumed.step == 2 and any(m.startswith("resuming") for m in messages)
    with pytest.raises(ValueError, match="unknown recipe 'distillation'; choose one of " + ", ".join(RECIPES)):
        train("distillation", config)
    # a run recording a recipe this qkv does not know is refused by name, not trained as something else
    state = resumed.checkpoint / "trainer_state.json"
    saved = json.loads(state.read_text())
    saved["run"]["recipe"] = "distillation"
    state.write_text(json.dumps(saved))
    (resumed.checkpoint / "manifest.json").unlink(missing_ok=True)  # else the edit reads as damage (the sha256 check)
    with pytest.raises(ValueError, match="unknown recipe 'distillation'"):
        resume(tmp_path / "run", {"max_steps": 3}, print_fn=lambda _: None)
    with pytest.raises(ValueError, match="unknown recipe 'distillation'"):
        evaluate_checkpoint(tmp_path / "run")


def test_resume_refuses_a_text_that_changed_since_the_run_trained_on_it(small_text, tmp_path):  # noqa: F811
    config = ModelConfig.preset("tiny-decoder", n_decoder_layers=1, **TINY)
    train("language-model", config, TrainConfig(max_steps=1, **QUIET), data=small_text, out_dir=tmp_path / "run",
          print_fn=lambda _: None)
    small_text.write_text(SMALL[::-1])
    with pytest.raises(ValueError, match=r"small.txt changed since this run trained on it \(recorded: 30,000 bytes, "
                                         r"sha256 \w{12}; now: 30,000 bytes, sha256 \w{12}\); resuming needs the text"):
        resume(tmp_path / "run", {"max_steps": 2}, print_fn=lambda _: None)


def test_a_translation_run_whose_zip_changed_neither_resumes_nor_rebuilds_its_split_nor_is_scored_on_it(tmp_path):
    pairs = [f"the cat number {i} sleeps\tle chat numéro {i} dort" for i in range(120)]
    data = tmp_path / "pairs.zip"  # a Tatoeba-style zip: the pairs in its one .txt member

    def write(lines):
        with zipfile.ZipFile(data, "w") as archive:
            archive.writestr("fra.txt", "\n".join(lines) + "\n")

    write(pairs)
    config = ModelConfig.preset("tiny-seq2seq", vocab_size=300, **TINY)
    result = train_translation(data, config, translation_train_config(max_steps=1, **QUIET), out_dir=tmp_path / "run",
                               max_tokens=256, n_test=10, n_valid=10, print_fn=lambda _: None)
    run = read_run_info(result.checkpoint)
    assert run["recipe"] == "translation" and run["data"] == str(data.resolve())
    assert len(held_out_test_split(result.checkpoint)[0]) == 10
    size = len(("\n".join(pairs) + "\n").encode("utf-8"))
    write(pairs[::-1])
    changed = (rf"pairs.zip changed since this run trained on it \(recorded: {size:,} bytes, sha256 \w{{12}}; "
               rf"now: {size:,} bytes, sha256 \w{{12}}\); ")
    with pytest.raises(ValueError, match=changed + "its split cannot be rebuilt"):
        held_out_test_split(result.checkpoint)
    with pytest.raises(ValueError, match=changed + "resuming needs the pairs it trained on"):
        resume(tmp_path / "run", {"max_steps": 2}, print_fn=lambda _: None)
    for split in ("val", "all"):
        with pytest.raises(ValueError, match=changed + ".*pass --data"):
            evaluate_checkpoint(tmp_path / "run", split=split)
    assert evaluate_checkpoint(tmp_path / "run", data=data, split="all")["loss"] > 0  # on purpose: scored


# the smallest preset of each model shape, and the data its recipe trains on
PRESET_OF = {"decoder": "tiny-decoder", "encoder": "tiny-encoder", "seq2seq": "tiny-seq2seq"}
OBJECTIVE_OF = {"decoder": "NextToken", "encoder": "MaskedLM", "seq2seq": "Seq2SeqObjective"}


# every recipe that builds its model from a preset; the fine-tune recipe starts from another model's weights
# (--init-from) and is driven end to end, resume included, by tests/test_finetune.py
@pytest.mark.parametrize("name", sorted(n for n in RECIPES if n != "finetune"))
def test_each_recipe_from_the_table_builds_the_model_and_objective_it_claims_and_resumes_through_its_own_hook(
        name, small_text, tmp_path, monkeypatch):  # noqa: F811
    recipe = RECIPES[name]
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("".join(f"a cat number {i} sleeps\tun chat numéro {i} dort\n" for i in range(60)))
    sizes = dict(TINY, n_encoder_layers=1, n_decoder_layers=1, vocab_size=300) if recipe.model_type == "seq2seq" \
        else dict(TINY, **{"n_encoder_layers" if recipe.model_type == "encoder" else "n_decoder_layers": 1})
    options = RunOptions(
        run={"preset": PRESET_OF[recipe.model_type], "out": str(tmp_path / "run"),
             "data": str(pairs if recipe.model_type == "seq2seq" else small_text),
             **({"test_size": 5, "valid_size": 5, "batch_tokens": 256} if recipe.model_type == "seq2seq" else {})},
        model=sizes, train={"max_steps": 1, **QUIET})
    assert recipe_chosen_by(options) is recipe  # what `qkv train` would run for these options
    result = recipe.start(options)
    run = read_run_info(result.checkpoint)
    assert (run["recipe"], run["model_type"]) == (name, recipe.model_type)
    model, tokenizer = recipe.load_run(result.checkpoint)
    assert model.model_type == recipe.model_type
    trainer = recipe.trainer_for_run(model, tokenizer, run, TrainConfig(max_steps=2, **QUIET), data=None,
                                     out_dir=tmp_path / "run", say=lambda _: None, directory=result.checkpoint)
    assert type(trainer.objective).__name__ == OBJECTIVE_OF[recipe.model_type]
    assert type(trainer.objective) is OBJECTIVES[recipe.model_type]
    loaded = []  # resume brings the model back through the recipe's own load_run, never a fixed loader

    def load_run(directory):
        loaded.append(directory)
        return recipe.load_run(directory)

    monkeypatch.setitem(RECIPES, name, dataclasses.replace(recipe, load_run=load_run))
    assert resume(tmp_path / "run", {"max_steps": 2}, print_fn=lambda _: None).step == 2
    assert loaded == [result.checkpoint]


def test_a_recipe_added_to_the_table_is_reached_by_qkv_train_with_its_own_options(tmp_path, capsys, monkeypatch):
    import qkv.recipes
    from qkv.cli import main

    started = []

    def start(options: RunOptions) -> TrainResult:
        started.append(options)
        return TrainResult(step=1, elapsed=0.0, val_loss=1.0, tokens_per_s=1.0,
                           checkpoint=tmp_path / "echo" / "step-000001", history=[], loss_curve=None)

    echo = dataclasses.replace(RECIPES["language-model"], name="echo", start=start, chooses=lambda o: "shout" in o.run,
                               options=(Option("shout", int, "how loud the echo is"),), options_title="echo runs")
    monkeypatch.setattr(qkv.recipes, "RECIPES", {"echo": echo, **RECIPES})
    config = tmp_path / "run.toml"
    config.write_text("shout = 2\nd_model = 16\n")
    assert main(["train", "--shout", "3", "--out", str(tmp_path / "echo"), "--max-steps", "1"]) == 0
    assert main(["train", "--config", str(config), "--lr", "0.5"]) == 0
    assert [(o.run, o.model, o.train) for o in started] == [
        ({"shout": 3, "out": str(tmp_path / "echo")}, {}, {"max_steps": 1}),
        ({"shout": 2}, {"d_model": 16}, {"lr": 0.5})]
    assert "done: step 1," in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "echo runs:\n  --shout SHOUT" in capsys.readouterr().out


def test_the_old_names_in_qkv_train_keep_their_meaning_and_warn_where_they_moved():
    import qkv.train

    with pytest.warns(DeprecationWarning, match=r"^qkv.train.RECIPES .* use qkv.recipes.RECIPE_FOR_MODEL_TYPE"):
        assert qkv.train.RECIPES == {"decoder": "language-model", "encoder": "masked-lm", "seq2seq": "translation"}
    with pytest.warns(DeprecationWarning, match=r"^qkv.train.evaluate .* use qkv.training.mean_loss"):
        from qkv.train import evaluate
    assert evaluate is mean_loss
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the names that did not move mean what they meant, silently
        from qkv.train import TrainConfig as Config  # noqa: F401
        exec("from qkv.train import *", {})
