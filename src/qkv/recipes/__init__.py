"""Recipes: each owns one kind of run end to end, from its data and model to its checkpoints and its resuming.

A recipe builds a run's data, tokenizer, model and objective, hands them to the trainer, and decides what its
checkpoints hold and how a saved run comes back:

- :mod:`~qkv.recipes.language_model`: a text → char or BPE tokens → a decoder (next token) or encoder (masked LM);
- :mod:`~qkv.recipes.translation`: a parallel file → a split by source sentence → shared BPE → a ``Transformer``;
- :mod:`~qkv.recipes.finetune`: a pretrained model (``--init-from``) → full or LoRA fine-tuning on a text or on
  chat conversations (loss on the assistant replies); ``export_run`` merges and writes it;
- :mod:`~qkv.recipes.runs`: what they share: what a recipe is (``Recipe``), the options ``qkv train`` hands it
  (``RunOptions``), the recipe a run records, its claimed directory, its data checked unchanged, continuing a
  saved run.

``RECIPES`` is the one table every entry point dispatches on: ``qkv train`` runs the first recipe that
``chosen_by`` its options (``start``), ``train(recipe, ...)`` starts a run of the named recipe, ``resume(path)``
continues a saved run with the recipe its metadata records (``run["recipe"]``), ``qkv eval`` scores it on what
that recipe rebuilds. A new recipe is one module and one entry here; the fine-tuning recipe (``qkv train
--init-from PATH [--lora-r N]``) goes before the language model, its ``start`` building its model from another
model's weights and its ``load_run`` putting saved adapters back on that base.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..checkpoint import claim_run_directory, load_trainer_state, run_to_resume
from ..config import ModelConfig
from ..tokenizers import BPE_VOCAB_SIZE
from ..training import RESUMABLE_OPTIONS, TrainConfig, TrainResult, process_rank, say_once
from .finetune import FINETUNE
from .language_model import LANGUAGE_MODEL, MASKED_LM
from .runs import RECIPE_FOR_MODEL_TYPE, Option, Recipe, RunOptions, continue_run, recipe_for, run_recipe
from .translation import TRANSLATION

__all__ = ["RECIPES", "Recipe", "Option", "RunOptions", "train", "start", "resume", "recipe_named",
           "recipe_of_run", "recipe_chosen_by", "recipe_for", "run_recipe", "RECIPE_FOR_MODEL_TYPE",
           "BPE_VOCAB_SIZE", "model_config_for"]

# recipe name (as a run records it) → the recipe, in the order `qkv train` asks them whether they take its options
RECIPES: dict[str, Recipe] = {recipe.name: recipe for recipe in (FINETUNE, LANGUAGE_MODEL, MASKED_LM, TRANSLATION)}


def recipe_named(name: str) -> Recipe:
    """``RECIPES[name]``, or a one-line error naming the recipes there are."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]


def recipe_of_run(run: dict) -> Recipe:
    """The recipe a run's metadata records (``run_recipe``), which resume and evaluation rebuild it with."""
    return recipe_named(run_recipe(run))


def recipe_chosen_by(options: RunOptions) -> Recipe:
    """The recipe ``qkv train`` runs for ``options``: the first of ``RECIPES`` whose ``chosen_by`` says yes."""
    for recipe in RECIPES.values():
        if recipe.chosen_by(options):
            return recipe
    trainable = ", ".join(f"{r.model_type} ({r.name})" for r in RECIPES.values())
    raise ValueError(f"no training recipe for model_type={options.model_type()!r}; trainable: {trainable}")


def start(options: RunOptions) -> TrainResult:
    """A new run of the recipe ``options`` choose (``recipe_chosen_by``): what ``qkv train`` does without
    ``--resume``."""
    return recipe_chosen_by(options).start(options)


def model_config_for(recipe: str, preset: str, overrides: dict | None = None, *, tokenizer: str) -> ModelConfig:
    """The model a new run of ``recipe`` trains: ``preset`` with ``overrides``, its vocabulary sized for its
    tokenizer ("char" or "bpe") by the recipe's own rules (its ``model_config``)."""
    return recipe_named(recipe).model_config(preset, overrides, tokenizer=tokenizer)


def train(recipe: str, *args, **kwargs) -> TrainResult:
    """Start a run of ``recipe`` ("language-model", "masked-lm", "translation"), with that recipe's options:
    ``qkv.recipes.language_model.train_language_model`` or ``qkv.recipes.translation.train_translation``."""
    return recipe_named(recipe).train(*args, **kwargs)


def resume(path: str | Path, overrides: dict | None = None, *, data: str | Path | None = None,
           out_dir: str | Path | None = None, print_fn: Callable[[str], None] | None = None) -> TrainResult:
    """Continue the run saved at ``path`` (a checkpoint or a run directory) exactly where it stopped, with the
    recipe it recorded (its ``load_run`` brings the model back).

    ``overrides`` may move where it stops (max_steps, time_budget), not its learning-rate schedule: steps beyond
    the schedule's end run at its final learning rate (see ``TrainConfig``).

    A path that is not a qkv run is refused before anything is written (``qkv.checkpoint.run_to_resume``); the
    run directory is then claimed (see ``claim_run_directory``): a run still training there is refused, and
    what a killed save left is tidied before the checkpoint is chosen."""
    say = print_fn or say_once
    overrides = dict(overrides or {})
    fixed = sorted(set(overrides) - set(RESUMABLE_OPTIONS))
    if fixed:
        raise ValueError(f"--resume continues a run with its saved settings; {', '.join(fixed)} cannot change "
                         f"(only {', '.join(RESUMABLE_OPTIONS)} can); drop them or start a new run")
    run_dir = run_to_resume(path, out_dir)
    with claim_run_directory(run_dir, resuming=True, primary=process_rank()[0] == 0):
        state, directory = load_trainer_state(path)
        recipe = recipe_of_run(state["run"])
        model, tok = recipe.load_run(directory)
        config = TrainConfig.from_dict(state["train_config"], source=directory / "trainer_state.json").replace(
            **overrides)
        return continue_run(recipe, model, tok, state, directory, config, data=data, out_dir=run_dir, say=say)
