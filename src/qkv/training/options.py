"""The options of a training run, ``TrainConfig``, and the values its word-valued fields allow."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..config import check_fields

__all__ = ["TrainConfig", "SCHEDULES", "PRECISIONS", "PARALLELS", "RESUMABLE_OPTIONS"]

SCHEDULES = ("cosine", "noam", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
PARALLELS = ("ddp", "fsdp")
# Options that may change when a run resumes: none changes what a step computes, except lr (a deliberate choice).
RESUMABLE_OPTIONS = ("max_steps", "time_budget", "eval_every", "eval_seconds", "eval_batches", "final_eval_batches",
                     "save_every", "keep_checkpoints", "log_every", "progress", "device", "lr")


@dataclass
class TrainConfig:
    """Every option of a training run (model hyperparameters live in ``ModelConfig``).

    ``max_steps`` and ``time_budget`` also set where the cosine schedule ends, once, when the run starts: a run
    resumed with larger ones (``resume``, ``qkv train --resume RUN --max-steps N``) stops later but keeps that end,
    so its extra steps run at the learning rate of the schedule's last step. A fresh schedule belongs to a new run
    (starting one from these weights is what ``--init-from``, planned, is for).
    """

    max_steps: int | None = None  # optimizer steps; None: run until time_budget (default 1000 if neither)
    time_budget: float | None = None  # seconds of the trainer's clock (training steps and evaluations)
    batch_size: int = 32
    context: int | None = None  # tokens per training window; default: the model's max_seq_len
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float | None = None  # peak learning rate (cosine, constant: default 1e-3); noam: the factor (default 1)
    schedule: str = "cosine"  # "cosine" (linear warm-up, cosine decay), "noam" (the paper's), "constant"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    adam_eps: float = 1e-8  # the paper uses 1e-9
    grad_clip: float | None = 1.0
    label_smoothing: float = 0.0
    mlm_probability: float = 0.15
    dtype: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on CPU; or "fp32", "bf16"
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory
    device: str = "auto"
    parallel: str = "ddp"  # under torchrun: "ddp" (each process holds the model) or "fsdp" (sharded across them)
    eval_every: int = 200  # steps between evaluations of the validation loss
    eval_seconds: float | None = None  # also evaluate each time the clock passes a multiple of this
    eval_batches: int = 20
    final_eval_batches: int | None = None  # the evaluation after the last step (default: eval_batches)
    save_every: int | None = None  # steps between checkpoints; None: at each evaluation; 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 1337
    val_fraction: float = 0.1
    progress: bool = True  # a progress bar (tqdm) on stderr

    def __post_init__(self) -> None:
        # first the types, by each field's annotation, so that the checks below compare numbers with numbers
        check_fields(TrainConfig, {f.name: getattr(self, f.name) for f in fields(self)})
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.parallel not in PARALLELS:
            raise ValueError(f"parallel={self.parallel!r} is not one of {', '.join(PARALLELS)}")
        if self.dtype not in PRECISIONS:
            raise ValueError(f"dtype={self.dtype!r} is not one of {', '.join(PRECISIONS)} (fp16 is not offered: "
                             "it overflows without loss scaling; bf16 does not)")
        for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "final_eval_batches",
                     "log_every",
                     "keep_checkpoints", "context"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.time_budget is not None and self.time_budget <= 0:
            raise ValueError(f"time_budget={self.time_budget} must be a positive number of seconds")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be positive")
        if not 0.0 <= self.label_smoothing < 1.0 or not 0.0 < self.mlm_probability < 1.0:
            raise ValueError(f"label_smoothing={self.label_smoothing} must lie in [0, 1) and "
                             f"mlm_probability={self.mlm_probability} in (0, 1)")
        if self.warmup_steps < 0 or (self.schedule == "noam" and self.warmup_steps < 1):
            raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0 (>= 1 for the noam schedule)")
        if self.max_steps is None and self.time_budget is None:
            self.max_steps = 1000

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else (1.0 if self.schedule == "noam" else 1e-3)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str | Path | None = None) -> TrainConfig:
        """Build from a mapping (a run's saved options): an unknown key names the closest field, a value of the
        wrong type its field and expected type, each error naming ``source`` (the file the values came from)."""
        if not isinstance(values, dict):
            where = "" if source is None else f"{source}: "
            raise ValueError(f"{where}expected a JSON object of TrainConfig fields, got {type(values).__name__}")
        try:
            return cls(**check_fields(cls, values, source=source))
        except ValueError as err:
            if source is None or str(err).startswith(str(source)):
                raise
            raise type(err)(f"{source}: {err}") from None

    def replace(self, **overrides: Any) -> TrainConfig:
        """A copy with ``overrides`` applied, checked like any other options."""
        return self.from_dict({**asdict(self), **overrides})
