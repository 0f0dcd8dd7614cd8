"""Recipes: each builds a run's data, tokenizer, model and objective, and hands them to the trainer.

- :mod:`~qkv.recipes.language_model`: a text → char or BPE tokens → a decoder (next token) or encoder (masked LM);
- :mod:`~qkv.recipes.translation`: a parallel file → a split by source sentence → shared BPE → a ``Transformer``;
- :mod:`~qkv.recipes.runs`: what they share: the recipe a run records, its claimed directory, its data checked
  unchanged, continuing a saved run.

``train(recipe, ...)`` starts a run of the named recipe; ``resume(path)`` continues a saved run with the recipe
its metadata records (``run["recipe"]``). ``RECIPES`` is the one table both dispatch on; a fine-tuning recipe
(``qkv train --init-from PATH --lora-r N``) takes its place there beside the others.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..checkpoint import claim_run_directory, load_checkpoint, load_trainer_state, run_directory_of
from ..config import ModelConfig
from ..tokenizers import BPE_VOCAB_SIZE
from ..training import RESUMABLE_OPTIONS, TrainConfig, TrainResult, process_rank, say_once
from .language_model import LANGUAGE_MODEL, MASKED_LM
from .runs import RECIPE_FOR_MODEL_TYPE, Recipe, continue_run, recipe_for, run_recipe
from .translation import TRANSLATION

__all__ = ["RECIPES", "Recipe", "train", "resume", "recipe_named", "recipe_of_run", "recipe_for", "run_recipe",
           "RECIPE_FOR_MODEL_TYPE", "BPE_VOCAB_SIZE", "model_config_for"]

# recipe name (as a run records it) → the recipe; "finetune" joins here
RECIPES: dict[str, Recipe] = {recipe.name: recipe for recipe in (LANGUAGE_MODEL, MASKED_LM, TRANSLATION)}


def recipe_named(name: str) -> Recipe:
    """``RECIPES[name]``, or a one-line error naming the recipes there are."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]


def recipe_of_run(run: dict) -> Recipe:
    """The recipe a run's metadata records (``run_recipe``), which resume and evaluation rebuild it with."""
    return recipe_named(run_recipe(run))


def model_config_for(recipe: str, preset: str, overrides: dict | None = None, *, tokenizer: str) -> ModelConfig:
    """The model a new run of ``recipe`` trains ("translation", or a language model: "language-model",
    "masked-lm"): ``preset`` with ``overrides``, its vocabulary sized for its tokenizer ("char" or "bpe").

    A byte-level BPE vocabulary takes ``BPE_VOCAB_SIZE`` unless ``vocab_size`` is given; translation keeps a
    preset's larger vocabulary but not a smaller one (tiny-seq2seq's 32 cannot hold BPE's 256 bytes) and trains
    a shared BPE only. A character vocabulary comes from the text, so a ``vocab_size`` is refused.
    """
    overrides = dict(overrides or {})
    if recipe == "translation" and tokenizer != "bpe":
        raise ValueError("translation uses a shared BPE vocabulary (its size: --vocab-size); drop --tokenizer")
    if "vocab_size" in overrides and tokenizer == "char":
        raise ValueError("--vocab-size sizes a BPE vocabulary, but a character tokenizer takes its vocabulary "
                         "from the text: drop --vocab-size or add --tokenizer bpe")
    config = ModelConfig.preset(preset, **overrides)
    if "vocab_size" in overrides or tokenizer == "char":
        return config
    if recipe == "translation" and config.vocab_size >= BPE_VOCAB_SIZE:
        return config
    return config.replace(vocab_size=BPE_VOCAB_SIZE)


def train(recipe: str, *args, **kwargs) -> TrainResult:
    """Start a run of ``recipe`` ("language-model", "masked-lm", "translation"), with that recipe's options:
    ``qkv.recipes.language_model.train_language_model`` or ``qkv.recipes.translation.train_translation``."""
    return recipe_named(recipe).train(*args, **kwargs)


def resume(path: str | Path, overrides: dict | None = None, *, data: str | Path | None = None,
           out_dir: str | Path | None = None, print_fn: Callable[[str], None] | None = None) -> TrainResult:
    """Continue the run saved at ``path`` (a checkpoint or a run directory) exactly where it stopped, with the
    recipe it recorded.

    ``overrides`` may move where it stops (max_steps, time_budget), not its learning-rate schedule: steps beyond
    the schedule's end run at its final learning rate (see ``TrainConfig``).

    The run directory is claimed first (see ``claim_run_directory``): a run still training there is refused, and
    what a killed save left is tidied before the checkpoint is chosen."""
    say = print_fn or say_once
    overrides = dict(overrides or {})
    fixed = sorted(set(overrides) - set(RESUMABLE_OPTIONS))
    if fixed:
        raise ValueError(f"--resume continues a run with its saved settings; {', '.join(fixed)} cannot change "
                         f"(only {', '.join(RESUMABLE_OPTIONS)} can); drop them or start a new run")
    if not Path(path).exists():  # before claiming it, which would create it
        raise FileNotFoundError(f"{path} does not exist; --resume takes a run directory written by qkv train "
                                "(or one of its step-* checkpoints)")
    run_dir = Path(out_dir) if out_dir is not None else run_directory_of(path)
    with claim_run_directory(run_dir, resuming=True, primary=process_rank()[0] == 0):
        state, directory = load_trainer_state(path)
        model, tok, _ = load_checkpoint(directory)
        config = TrainConfig.from_dict(state["train_config"], source=directory / "trainer_state.json").replace(
            **overrides)
        return continue_run(recipe_of_run(state["run"]), model, tok, state, directory, config, data=data,
                            out_dir=run_dir, say=say)
