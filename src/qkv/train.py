"""The old home of training's names, kept so that existing imports work (each now lives in its layer).

The trainer and its parts are in :mod:`qkv.training` (options, schedules, objectives, the trainer, callbacks,
distributed, CPU tuning), building and resuming runs in :mod:`qkv.recipes`, scoring checkpoints in
:mod:`qkv.evaluation`. ``from qkv.train import TrainConfig, Trainer, train, resume, evaluate_checkpoint`` keeps
working; new code imports from those packages. ``train`` here is the language-model recipe's
``train_language_model``. Two names keep their old meaning with a ``DeprecationWarning``, since the new homes use
them for something else: ``RECIPES`` (model_type → recipe name, now ``qkv.recipes.RECIPE_FOR_MODEL_TYPE``;
``qkv.recipes.RECIPES`` maps recipe names to recipes) and ``evaluate`` (the mean loss of batches, now
``qkv.training.mean_loss``; ``qkv.evaluation`` scores checkpoints).
"""

import warnings

from .data import BUNDLED
from .evaluation import evaluate_checkpoint
from .losses import IGNORE_INDEX
from .recipes import RECIPE_FOR_MODEL_TYPE, resume, run_recipe
from .recipes.language_model import build_tokenizer
from .recipes.language_model import train_language_model as train
from .training import (
    CSV_FIELDS,
    MASK_TOKEN,
    OBJECTIVES,
    PARALLELS,
    PRECISIONS,
    RESUMABLE_OPTIONS,
    SCHEDULES,
    BatchSource,
    MaskedLM,
    NextToken,
    Objective,
    TrainConfig,
    Trainer,
    TrainingDiverged,
    TrainingInterrupted,
    TrainResult,
    adamw_kernel,
    fastest_cpu_settings,
    mean_loss,
    noam_lr,
    param_groups,
    process_rank,
    say_once,
    usable_cores,
    warmup_cosine,
)
from .training.callbacks import plot_loss_curve

# old name → (what it still is, the one-line warning naming its new home)
_MOVED = {
    "RECIPES": (RECIPE_FOR_MODEL_TYPE, "qkv.train.RECIPES (model_type → recipe name) is deprecated: use "
                "qkv.recipes.RECIPE_FOR_MODEL_TYPE; qkv.recipes.RECIPES maps recipe names to recipes"),
    "evaluate": (mean_loss, "qkv.train.evaluate (the mean loss per predicted token of batches) is deprecated: use "
                 "qkv.training.mean_loss; qkv.evaluation.evaluate_checkpoint scores a checkpoint"),
}


def __getattr__(name: str):
    if name in _MOVED:
        value, message = _MOVED[name]
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        return value
    raise AttributeError(f"module 'qkv.train' has no attribute {name!r}")

__all__ = ["TrainConfig", "Objective", "NextToken", "MaskedLM", "OBJECTIVES", "BatchSource", "Trainer",
           "TrainResult", "TrainingDiverged", "TrainingInterrupted", "warmup_cosine", "noam_lr", "param_groups",
           "train", "usable_cores", "fastest_cpu_settings", "resume", "evaluate_checkpoint",
           "build_tokenizer", "MASK_TOKEN",
           # public before the move too, though not listed then
           "BUNDLED", "CSV_FIELDS", "IGNORE_INDEX", "PARALLELS", "PRECISIONS", "RESUMABLE_OPTIONS",
           "SCHEDULES", "adamw_kernel", "plot_loss_curve", "process_rank", "run_recipe", "say_once"]
