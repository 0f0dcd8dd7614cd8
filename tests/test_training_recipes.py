"""The trainer's callbacks and the recipes on top of it: hooks in order however a run ends, a trainer without
callbacks that writes nothing but checkpoints, train(recipe)/resume(path) dispatching on the recorded recipe, and
the one data-unchanged check refusing a run's data once it changed."""

from __future__ import annotations

import json
import os
import signal

import pytest
from test_train import SMALL, _token_cache_in_tmp, small_text  # noqa: F401 (fixtures: the token cache, a text)

from qkv import ModelConfig
from qkv.checkpoint import read_run_info
from qkv.data import Corpus, WindowBatches, load_tokens
from qkv.evaluation import evaluate_checkpoint
from qkv.models import DecoderLM
from qkv.recipes import RECIPES, resume, train
from qkv.recipes.translation import held_out_test_split, train_translation, translation_train_config
from qkv.tokenizers import Tokenizer
from qkv.training import Callback, StopOnSignal, TrainConfig, Trainer, TrainingInterrupted

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
    with pytest.raises(ValueError, match="unknown recipe 'finetune'; choose one of " + ", ".join(RECIPES)):
        train("finetune", config)
    # a run recording a recipe this qkv does not know is refused by name, not trained as something else
    state = resumed.checkpoint / "trainer_state.json"
    saved = json.loads(state.read_text())
    saved["run"]["recipe"] = "finetune"
    state.write_text(json.dumps(saved))
    (resumed.checkpoint / "manifest.json").unlink(missing_ok=True)  # else the edit reads as damage (the sha256 check)
    with pytest.raises(ValueError, match="unknown recipe 'finetune'"):
        resume(tmp_path / "run", {"max_steps": 3}, print_fn=lambda _: None)
    with pytest.raises(ValueError, match="unknown recipe 'finetune'"):
        evaluate_checkpoint(tmp_path / "run")


def test_resume_refuses_a_text_that_changed_since_the_run_trained_on_it(small_text, tmp_path):  # noqa: F811
    config = ModelConfig.preset("tiny-decoder", n_decoder_layers=1, **TINY)
    train("language-model", config, TrainConfig(max_steps=1, **QUIET), data=small_text, out_dir=tmp_path / "run",
          print_fn=lambda _: None)
    small_text.write_text(SMALL[::-1])
    with pytest.raises(ValueError, match=r"the data .*small.txt differs from the data this run trained on"):
        resume(tmp_path / "run", {"max_steps": 2}, print_fn=lambda _: None)


def test_a_translation_run_whose_file_changed_neither_resumes_nor_rebuilds_its_test_split(tmp_path):
    pairs = [f"the cat number {i} sleeps\tle chat numéro {i} dort" for i in range(120)]
    data = tmp_path / "pairs.tsv"
    data.write_text("\n".join(pairs) + "\n", encoding="utf-8")
    config = ModelConfig.preset("tiny-seq2seq", vocab_size=300, **TINY)
    result = train_translation(data, config, translation_train_config(max_steps=1, **QUIET), out_dir=tmp_path / "run",
                               max_tokens=256, n_test=10, n_valid=10, print_fn=lambda _: None)
    assert read_run_info(result.checkpoint)["recipe"] == "translation"
    assert len(held_out_test_split(result.checkpoint)[0]) == 10
    data.write_text("\n".join(pairs[::-1]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="differs from the data this run trained on.*split cannot be rebuilt"):
        held_out_test_split(result.checkpoint)
    with pytest.raises(ValueError, match="differs from the data this run trained on.*pass the same --data"):
        resume(tmp_path / "run", {"max_steps": 2}, print_fn=lambda _: None)


def test_each_recipe_names_the_model_shape_it_trains():
    assert {name: recipe.model_type for name, recipe in RECIPES.items()} == {
        "language-model": "decoder", "masked-lm": "encoder", "translation": "seq2seq"}
