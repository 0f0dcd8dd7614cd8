"""What every recipe shares: the recipe a run records, the run directory it claims, the data it must find
unchanged, and how a saved run continues.

A run's metadata (``trainer_state``'s ``run``) names its ``recipe`` and the absolute path and sha256 of its
data; ``resume`` and ``qkv eval`` dispatch on the one and check the other here, once for every recipe.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint import claim_run_directory
from ..config import ModelConfig
from ..data import BUNDLED
from ..models import model_class_for
from ..training import Trainer, TrainResult, process_rank

__all__ = ["Recipe", "RECIPE_FOR_MODEL_TYPE", "recipe_for", "run_recipe", "claim_new_run", "recorded_data",
           "absolute_source", "check_data_unchanged", "continue_run"]

# model_type → the recipe a run of that model records (``run["recipe"]``)
RECIPE_FOR_MODEL_TYPE = {"decoder": "language-model", "encoder": "masked-lm", "seq2seq": "translation"}


@dataclass(frozen=True)
class Recipe:
    """A way to train: it builds the data, tokenizer, model and objective of a run, and rebuilds them to resume
    or evaluate one.

    - ``train(...)``: a new run (each recipe's own options) → ``TrainResult``;
    - ``trainer_for_run(model, tokenizer, run, config, *, data, out_dir, say, directory)``: the trainer of the
      run saved in ``directory``, its data read again (``data``, or the run's recorded file) and checked
      unchanged;
    - ``evaluation_batches(model, tokenizer, objective, run, directory, *, data, split, batch_size, context,
      max_batches)``: what ``qkv eval`` scores → (batches, where they came from).
    """

    name: str
    model_type: str
    train: Callable[..., TrainResult]
    trainer_for_run: Callable[..., Trainer]
    evaluation_batches: Callable[..., tuple[list, str]]


def recipe_for(model_config: ModelConfig, model_type: str | None = None) -> str:
    """The recipe that trains a model: ``model_type`` if given, else the shape ``model_config`` describes
    (``qkv.models.model_class_for``): an encoder-decoder → "translation", an encoder → "masked-lm", a
    decoder → "language-model"."""
    model_type = model_type or model_class_for(model_config).model_type
    if model_type not in RECIPE_FOR_MODEL_TYPE:
        raise ValueError(f"no training recipe for model_type={model_type!r}; trainable: "
                         f"{', '.join(RECIPE_FOR_MODEL_TYPE)}")
    return RECIPE_FOR_MODEL_TYPE[model_type]


def run_recipe(run: dict) -> str:
    """The recipe a run's metadata names (runs from before ``recipe`` was recorded: inferred)."""
    if "recipe" in run:
        return run["recipe"]
    if run.get("task") == "translation":
        return "translation"
    return RECIPE_FOR_MODEL_TYPE.get(run.get("model_type"), "language-model")


def claim_new_run(out_dir: str | Path, *, overwrite: bool = False) -> contextlib.AbstractContextManager:
    """Hold ``out_dir`` for a new run (see ``qkv.checkpoint.claim_run_directory``): a directory that already
    holds a run is refused unless ``overwrite``; under torchrun the first process tidies, the others wait."""
    return claim_run_directory(Path(out_dir), overwrite=overwrite, primary=process_rank()[0] == 0)


def absolute_source(source: str | Path) -> str:
    """Where a run's data came from, as it records it: an absolute path (so that ``--resume`` and ``qkv eval``
    work from any directory), or the name of the bundled text."""
    return BUNDLED if str(source) == BUNDLED else str(Path(source).resolve())


def recorded_data(run: dict, data: str | Path | None, directory: Path, fix: str) -> Any:
    """``data`` if given, else the file the run trained on (its recorded path), named clearly when it is gone."""
    if data is not None:
        return data
    if run.get("data") not in (None, BUNDLED) and not Path(run["data"]).exists():
        raise FileNotFoundError(f"{directory} trained on {run['data']}, which is not there any more; {fix}")
    return run.get("data")


def check_data_unchanged(sha256: str, source: str, run: dict, fix: str) -> None:
    """Refuse data whose sha256 differs from the one the run recorded: its batches (or its split) would not be
    the ones it trained on. ``fix`` says what to do instead."""
    if sha256 != run["data_sha256"]:
        raise ValueError(f"the data {source} differs from the data this run trained on ({run['data']}); {fix}")


def continue_run(recipe: Recipe, model, tokenizer, state: dict, directory: Path, config, *,
                 data: str | Path | None, out_dir: str | Path, say: Callable[[str], None]) -> TrainResult:
    """Continue a saved run exactly: the recipe rebuilds its trainer, which takes the saved state (step, clock,
    optimizer, schedule, random generators) and trains on from there."""
    trainer = recipe.trainer_for_run(model.train(), tokenizer, state["run"], config, data=data, out_dir=out_dir,
                                     say=say, directory=directory)
    trainer.load_state_dict(state)  # the optimizer's settings come back too (the paper's eps, for translation)
    trainer.last_checkpoint = directory
    say(f"resuming {directory} at step {trainer.step} ({trainer.elapsed:.1f} s on the clock)")
    return trainer.fit()
