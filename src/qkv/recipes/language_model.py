"""The language-model recipes: a text → a tokenizer trained on it → token windows → a decoder (next token) or an
encoder (masked LM) → the trainer.

``train_language_model`` starts a run; ``LANGUAGE_MODEL`` and ``MASKED_LM`` are the recipes ``qkv.recipes``
dispatches on to start (``qkv train``), resume or evaluate one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..config import ModelConfig
from ..data import Corpus, TokenSplits, WindowBatches, load_tokens, read_corpus
from ..models import build_model, model_class_for
from ..tokenizers import BPE_VOCAB_SIZE, Tokenizer
from ..training import MASK_TOKEN, OBJECTIVES, Objective, TrainConfig, Trainer, TrainResult, say_once
from .runs import (
    Recipe,
    RunOptions,
    absolute_source,
    check_data_unchanged,
    claim_new_run,
    data_size,
    recipe_for,
    recorded_data,
)

__all__ = ["BPE_VOCAB_SIZE", "build_tokenizer", "language_model_config", "train_language_model", "LANGUAGE_MODEL",
           "MASKED_LM"]


def language_model_config(preset: str, overrides: dict | None = None, *, tokenizer: str = "char") -> ModelConfig:
    """The model a new language-model or masked-LM run trains: ``preset`` with ``overrides``, its vocabulary sized
    for its tokenizer. A character vocabulary comes from the text, so a ``vocab_size`` is refused; a byte-level
    BPE vocabulary takes ``BPE_VOCAB_SIZE`` unless ``vocab_size`` is given."""
    overrides = dict(overrides or {})
    if "vocab_size" in overrides and tokenizer == "char":
        raise ValueError("--vocab-size sizes a BPE vocabulary, but a character tokenizer takes its vocabulary "
                         "from the text: drop --vocab-size or add --tokenizer bpe")
    config = ModelConfig.preset(preset, **overrides)
    if "vocab_size" in overrides or tokenizer == "char":
        return config
    return config.replace(vocab_size=BPE_VOCAB_SIZE)


def build_tokenizer(corpus: Corpus, kind: str, model_type: str, bpe_vocab_size: int | None) -> Tokenizer:
    """A tokenizer trained on ``corpus``: "char" or byte-level "bpe" (``bpe_vocab_size`` tokens, default
    ``BPE_VOCAB_SIZE``); masked-LM models get a mask token."""
    special = [MASK_TOKEN] if model_type == "encoder" else []
    if kind == "char":
        return Tokenizer.char(corpus.text, special_tokens=special)
    if kind == "bpe":
        return Tokenizer.bpe(corpus.text, vocab_size=bpe_vocab_size or BPE_VOCAB_SIZE, special_tokens=special)
    raise ValueError(f"tokenizer={kind!r} is not one of char, bpe")


def train_language_model(model_config: ModelConfig | None = None, config: TrainConfig | None = None, *,
                         data: str | Path | None = None, out_dir: str | Path = "runs/train", tokenizer: str = "char",
                         model_type: str | None = None, overwrite: bool = False,
                         print_fn: Callable[[str], None] | None = None) -> TrainResult:
    """Train a model from scratch on ``data`` (default: the bundled tiny Shakespeare); checkpoints go to ``out_dir``.

    ``model_config.vocab_size`` is the BPE vocabulary size to train; a character tokenizer sets its own. An
    ``out_dir`` that already holds a run is refused unless ``overwrite`` (its checkpoints and metrics are deleted).
    """
    say = print_fn or say_once
    config = config or TrainConfig()
    model_config = model_config or ModelConfig.preset("tiny-decoder")
    model_type = model_type or model_class_for(model_config).model_type
    recipe = recipe_for(model_config, model_type)
    if recipe not in (LANGUAGE_MODEL.name, MASKED_LM.name):
        raise ValueError(f"a {recipe} run trains on a parallel file, not on a text: use "
                         "qkv.recipes.translation.train_translation (qkv train PRESET --data PARALLEL_FILE)")
    with claim_new_run(out_dir, overwrite=overwrite):
        corpus = read_corpus(data)
        tok = build_tokenizer(corpus, tokenizer, model_type, model_config.vocab_size)
        model_config = model_config.replace(vocab_size=tok.vocab_size)
        torch.manual_seed(config.seed)
        model = build_model(model_config, model_type)
        run_info = {"recipe": recipe, "data": absolute_source(corpus.source), "data_sha256": corpus.sha256,
                    "data_bytes": data_size(corpus.text), "tokenizer": tokenizer, "model_type": model_type}
        trainer, splits = _trainer(model, tok, corpus, config, out_dir, run_info, say)
        say(f"training a {model.num_parameters():,}-parameter {type(model).__name__} on {corpus.source} "
            f"({len(splits.train):,} train / {len(splits.val):,} validation tokens, {tok.kind} vocabulary "
            f"{tok.vocab_size}) on {trainer.device}")
        return trainer.fit()


def _context(model, context: int | None, fix: str) -> int:
    """Tokens per window: ``context``, or the model's max_seq_len; never longer than it."""
    context = model.config.max_seq_len if context is None else context
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise ValueError(f"context={context!r} must be a positive integer (tokens per window; leave it out for "
                         "the model's max_seq_len)")
    if context > model.config.max_seq_len:
        raise ValueError(f"context={context} is longer than max_seq_len={model.config.max_seq_len}; {fix}")
    return context


def _trainer(model, tok: Tokenizer, corpus: Corpus, config: TrainConfig, out_dir, run_info: dict,
             say) -> tuple[Trainer, TokenSplits]:
    """The trainer of a language-model run: random windows of the first 90% of the tokens, fixed windows of the
    last 10% to validate."""
    context = _context(model, config.context, "lower --context or raise --max-seq-len")
    objective = OBJECTIVES[model.model_type](tok, config)
    splits = load_tokens(corpus, tok, val_fraction=config.val_fraction)
    window = context + objective.window_extra
    train_windows = WindowBatches(splits.train, window, config.batch_size, seed=config.seed, name="train")
    val_windows = WindowBatches(splits.val, window, config.batch_size, seed=config.seed, name="validation")
    trainer = Trainer(model, tok, train_windows, val_windows, config, out_dir, objective=objective, run_info=run_info,
                      print_fn=say)
    return trainer, splits


def _trainer_for_run(model, tokenizer: Tokenizer, run: dict, config: TrainConfig, *, data: str | Path | None,
                     out_dir: str | Path, say, directory: Path) -> Trainer:
    corpus = read_corpus(recorded_data(run, data, directory, "pass --data with the same text to resume"))
    check_data_unchanged(corpus.sha256, data_size(corpus.text), corpus.source, run,
                         "resuming needs the text it trained on: put that text back (or pass --data with a copy of "
                         "it), or start a new run on this one")
    return _trainer(model, tokenizer, corpus, config, out_dir, run, say)[0]


def _evaluation_batches(model, tokenizer: Tokenizer, objective: Objective, run: dict, directory: Path, *,
                        data: str | Path | None, split: str, batch_size: int, context: int | None,
                        max_batches: int) -> tuple[list, str]:
    """Windows of the text (``data``, default the run's, refused if it changed since): its last 10%
    (``split="val"``) or all of it."""
    corpus = read_corpus(recorded_data(run, data, directory, "pass --data with the text to evaluate on"))
    if data is None and "data_sha256" in run:
        check_data_unchanged(corpus.sha256, data_size(corpus.text), corpus.source, run,
                             f"its last 10% is not the validation text the run held out; pass --data "
                             f"{corpus.source} to evaluate this text on purpose, or put the original back")
    context = _context(model, context, "lower --context")
    splits = load_tokens(corpus, tokenizer)
    tokens = splits.val if split == "val" else np.concatenate([splits.train, splits.val])
    batches = WindowBatches(tokens, context + objective.window_extra, batch_size,
                            name="validation" if split == "val" else "text").fixed(max_batches)
    return batches, corpus.source


def _start(options: RunOptions, *, model_type: str) -> TrainResult:
    """``qkv train`` → a new run: the preset's model, its vocabulary from the text's tokenizer (default char)."""
    tokenizer = options.run.get("tokenizer", "char")
    model_config = language_model_config(options.preset, options.model, tokenizer=tokenizer)
    return train_language_model(model_config, TrainConfig(**options.train), data=options.run.get("data"),
                                out_dir=options.out_dir, tokenizer=tokenizer, model_type=model_type,
                                overwrite=options.overwrite)


def _recipe(name: str, model_type: str) -> Recipe:
    return Recipe(name, model_type, train=functools.partial(train_language_model, model_type=model_type),
                  start=functools.partial(_start, model_type=model_type), model_config=language_model_config,
                  trainer_for_run=_trainer_for_run, evaluation_batches=_evaluation_batches)


LANGUAGE_MODEL = _recipe("language-model", "decoder")
MASKED_LM = _recipe("masked-lm", "encoder")
