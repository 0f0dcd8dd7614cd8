"""What every recipe shares: the ``Recipe`` type, the options ``qkv train`` hands it, and the run it records.

That is: the recipe a run records, the run directory it claims, the data it must find unchanged, and how a saved
run continues.

A run's metadata (``trainer_state``'s ``run``) names its ``recipe`` and the absolute path, size and sha256 of its
data; ``resume`` and ``qkv eval`` dispatch on the one and check the other here, once for every recipe.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..checkpoint import claim_run_directory, load_checkpoint
from ..config import ModelConfig
from ..data import BUNDLED
from ..models import model_class_for
from ..tokenizers import Tokenizer
from ..training import Trainer, TrainResult, process_rank

__all__ = ["Recipe", "Option", "RunOptions", "DEFAULT_PRESET", "RECIPE_FOR_MODEL_TYPE", "recipe_for", "run_recipe",
           "claim_new_run", "recorded_data", "absolute_source", "data_size", "check_data_unchanged", "load_saved_model",
           "continue_run"]

DEFAULT_PRESET = "tiny-decoder"

# model_type → the recipe a run of that model records (``run["recipe"]``)
RECIPE_FOR_MODEL_TYPE = {"decoder": "language-model", "encoder": "masked-lm", "seq2seq": "translation"}


@dataclass(frozen=True)
class Option:
    """One of a recipe's own ``qkv train`` options: ``--NAME`` (``name``, dashes for underscores) of ``type``,
    listed in the recipe's group of ``qkv train --help`` (also a ``--config`` key); it reaches the recipe's
    ``start`` in ``RunOptions.run``."""

    name: str
    type: type
    help: str


@dataclass
class RunOptions:
    """What ``qkv train`` was asked for a new run (its flags over its ``--config`` file): ``run`` (``preset``,
    ``data``, ``tokenizer``, ``model_type``, ``out`` and each recipe's own options), ``model`` (``ModelConfig``
    fields), ``train`` (``TrainConfig`` fields), ``overwrite``."""

    run: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False

    @property
    def preset(self) -> str:
        return self.run.get("preset", DEFAULT_PRESET)

    @property
    def out_dir(self) -> str:
        """``--out``, default ``runs/<preset>``."""
        return self.run.get("out", f"runs/{self.preset}")

    def model_type(self) -> str:
        """``--model-type``, else the shape the preset (with its field overrides) describes."""
        return self.run.get("model_type") or model_class_for(ModelConfig.preset(self.preset, **self.model)).model_type


def load_saved_model(directory: Path) -> tuple[nn.Module, Tokenizer]:
    """A saved run's model as a checkpoint holds it whole, and its tokenizer: how a recipe that saves everything
    resumes."""
    model, tokenizer, _ = load_checkpoint(directory)
    return model, tokenizer


@dataclass(frozen=True)
class Recipe:
    """A way to train, owning a run end to end: how its model is built, what its checkpoints hold, how it resumes
    and what ``qkv eval`` scores it on. ``qkv.recipes.RECIPES`` lists them; ``qkv train``, ``resume`` and
    ``qkv eval`` dispatch through that table and nothing else, so a new recipe is one module and one entry there.

    - ``chosen_by(options)``: whether ``qkv train`` runs this recipe for ``options`` (``RunOptions``); the first
      recipe of the table that says yes runs. Default: the options' model type is ``model_type``.
    - ``start(options)``: a new run from ``qkv train``'s options → ``TrainResult``. The recipe builds its model here
      (from a preset and its tokenizer's vocabulary; a fine-tuning recipe, from another model's weights);
    - ``train(...)``: a new run from Python, with the recipe's own arguments;
    - ``model_config(preset, overrides, *, tokenizer)``: the model a new run trains (its vocabulary rules);
    - ``options`` / ``options_title``: the recipe's own ``qkv train`` flags (``Option``), in a group so titled;
    - ``load_run(directory)`` → (model, tokenizer): a saved run's model back, to resume it. Default
      ``load_saved_model`` (the whole model from the checkpoint); a recipe whose checkpoints hold adapters only
      rebuilds its base model and loads them onto it;
    - ``trainer_for_run(model, tokenizer, run, config, *, data, out_dir, say, directory)``: the trainer of the
      run saved in ``directory``, its data read again (``data``, or the run's recorded file) and checked
      unchanged. What a checkpoint holds is the recipe's too: the trainers it builds (here and in ``start``) save
      it, ``qkv.training.Trainer`` the whole model;
    - ``evaluation_batches(model, tokenizer, objective, run, directory, *, data, split, batch_size, context,
      max_batches)``: what ``qkv eval`` scores → (batches, where they came from).
    """

    name: str
    model_type: str
    train: Callable[..., TrainResult]
    start: Callable[[RunOptions], TrainResult]
    model_config: Callable[..., ModelConfig]
    trainer_for_run: Callable[..., Trainer]
    evaluation_batches: Callable[..., tuple[list, str]]
    load_run: Callable[[Path], tuple[nn.Module, Tokenizer]] = load_saved_model
    options: tuple[Option, ...] = ()
    options_title: str = ""
    chooses: Callable[[RunOptions], bool] | None = None

    def chosen_by(self, options: RunOptions) -> bool:
        """Whether ``qkv train`` runs this recipe for ``options``: ``chooses(options)``, or by default whether the
        options' model type is this recipe's."""
        return self.chooses(options) if self.chooses is not None else options.model_type() == self.model_type


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


def data_size(text: str) -> int:
    """The size a run records for a text: its bytes in UTF-8 (what its sha256 is taken of)."""
    return len(text.encode("utf-8"))


def check_data_unchanged(sha256: str, size: int | None, source: str, run: dict, fix: str) -> None:
    """Refuse data whose sha256 differs from the one the run recorded: its batches (or its split) would not be
    the ones it trained on. The one line says what changed (size and sha256 recorded, and now) and ``fix``, what
    to do instead."""
    if sha256 == run["data_sha256"]:
        return
    recorded = run.get("data")
    what = (f"{source} changed since this run trained on it" if _same_path(source, recorded) else
            f"{source} is not the data this run trained on ({recorded})")

    def described(size, digest):
        return (f"{size:,} bytes, " if size is not None else "") + f"sha256 {digest[:12]}"

    raise ValueError(f"{what} (recorded: {described(run.get('data_bytes'), run['data_sha256'])}; now: "
                     f"{described(size, sha256)}); {fix}")


def _same_path(source: str, recorded: str | None) -> bool:
    if recorded is None:
        return False
    if source == recorded:
        return True
    try:
        return absolute_source(source) == recorded or Path(source).resolve() == Path(recorded).resolve()
    except OSError:
        return False


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
