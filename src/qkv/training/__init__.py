"""Training: a trainer that knows no recipe, and the parts it is built from.

- :mod:`~qkv.training.options`: ``TrainConfig``, every option of a run, and the values its fields allow;
- :mod:`~qkv.training.schedules`: the learning-rate formulas (warm-up + cosine, the paper's noam, constant);
- :mod:`~qkv.training.objectives`: next-token, masked-LM and seq2seq losses in one registry, ``OBJECTIVES``;
- :mod:`~qkv.training.optimizer`: AdamW's weight-decay groups and kernel;
- :mod:`~qkv.training.trainer`: ``Trainer``: step, accumulate, clip, optimise, evaluate, save, resume exactly;
- :mod:`~qkv.training.callbacks`: signals, progress bar, metrics.csv and the loss curve, around the loop;
- :mod:`~qkv.training.distributed`: torchrun: ranks, DDP/FSDP, sums across processes;
- :mod:`~qkv.training.cpu`: the cores to use and the fastest (threads, precision) on this CPU.

Where a run's data, tokenizer and model come from is a recipe's business: :mod:`qkv.recipes`.
"""

from .callbacks import CSV_FIELDS, Callback, LossCurve, MetricsLog, ProgressBar, StopOnSignal, default_callbacks
from .cpu import fastest_cpu_settings, usable_cores
from .distributed import process_rank, say_once
from .objectives import (
    MASK_TOKEN,
    OBJECTIVES,
    BatchSource,
    MaskedLM,
    NextToken,
    Objective,
    Seq2SeqObjective,
    mean_loss,
)
from .optimizer import adamw_kernel, param_groups
from .options import PARALLELS, PRECISIONS, RESUMABLE_OPTIONS, SCHEDULES, TrainConfig
from .schedules import learning_rate, noam_lr, warmup_cosine
from .trainer import Trainer, TrainingDiverged, TrainingInterrupted, TrainResult

__all__ = ["TrainConfig", "SCHEDULES", "PRECISIONS", "PARALLELS", "RESUMABLE_OPTIONS", "warmup_cosine", "noam_lr",
           "learning_rate", "MASK_TOKEN", "BatchSource", "Objective", "NextToken", "MaskedLM", "Seq2SeqObjective",
           "OBJECTIVES", "mean_loss", "param_groups", "adamw_kernel", "Trainer", "TrainResult", "TrainingDiverged",
           "TrainingInterrupted", "Callback", "StopOnSignal", "ProgressBar", "MetricsLog", "LossCurve",
           "default_callbacks", "CSV_FIELDS", "process_rank", "say_once", "usable_cores", "fastest_cpu_settings"]
