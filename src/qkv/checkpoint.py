"""Checkpoints: a directory of plain files, written atomically, never a pickle.

A qkv checkpoint directory holds

- ``config.json``: the ``ModelConfig`` fields plus ``"format": "qkv"``, ``format_version`` and ``model_type``;
- ``model.safetensors``: the model's ``state_dict``;
- ``tokenizer.json``: the Hugging Face ``tokenizers`` file;
- for training runs, ``trainer_state.json`` (step, schedule, data position, RNG states, options) and
  ``trainer_state.safetensors`` (the optimizer's moment tensors and the torch RNG states).

A training run directory holds checkpoints ``step-000100/``, ``step-000200/``, ... and a file ``latest`` naming
the newest one; every path that takes a checkpoint also takes the run directory. A checkpoint is written into a
temporary directory and renamed into place, and ``latest`` is replaced by rename too, so a crash mid-write leaves
the previous checkpoint as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .config import FORMAT_VERSION, ModelConfig
from .models import build_model, check_finite_weights
from .tokenizers import Tokenizer

__all__ = ["CONFIG", "WEIGHTS", "TOKENIZER", "STATE_JSON", "STATE_TENSORS", "PICKLE_SUFFIXES", "save_checkpoint",
           "save_run_checkpoint", "write_atomic", "resolve_checkpoint", "check_checkpoint_dir", "load_checkpoint",
           "load_trainer_state", "flatten_state", "unflatten_state", "is_qkv_checkpoint"]

CONFIG, WEIGHTS, TOKENIZER = "config.json", "model.safetensors", "tokenizer.json"
STATE_JSON, STATE_TENSORS = "trainer_state.json", "trainer_state.safetensors"
LATEST = "latest"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


# -- nested state ↔ (JSON, flat tensors) --------------------------------------------------------------------------
def flatten_state(obj: Any, tensors: dict[str, Tensor] | None = None, prefix: str = "") -> tuple[Any, dict]:
    """Split a nested structure (an optimizer ``state_dict``, RNG states) into JSON and a flat tensor dict.

    Each tensor is replaced by ``{"__tensor__": key}``; dicts with non-string keys keep them as ``__int_keys__``.
    """
    tensors = {} if tensors is None else tensors
    if isinstance(obj, Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}, tensors
    if isinstance(obj, dict):
        int_keys = any(isinstance(k, int) for k in obj)
        out = {str(k): flatten_state(v, tensors, f"{prefix}.{k}" if prefix else str(k))[0] for k, v in obj.items()}
        return ({"__int_keys__": out} if int_keys else out), tensors
    if isinstance(obj, (list, tuple)):
        return [flatten_state(v, tensors, f"{prefix}.{i}")[0] for i, v in enumerate(obj)], tensors
    return obj, tensors


def unflatten_state(obj: Any, tensors: dict[str, Tensor]) -> Any:
    """The inverse of ``flatten_state`` (tuples come back as lists)."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__int_keys__"}:
            return {int(k): unflatten_state(v, tensors) for k, v in obj["__int_keys__"].items()}
        return {k: unflatten_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    return obj


# -- writing ------------------------------------------------------------------------------------------------------
def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it: a crash never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def save_checkpoint(directory: str | Path, model: torch.nn.Module, tokenizer: Tokenizer, *,
                    trainer_state: dict | None = None, weights: dict[str, Tensor] | None = None) -> Path:
    """Write a checkpoint directory atomically: into a temporary sibling, then renamed to ``directory``.

    ``weights``: the tensors to write when ``model.state_dict()`` does not hold them whole (a sharded model)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        model.config.save(tmp / CONFIG, model_type=model.model_type)
        weights = model.state_dict() if weights is None else weights
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / WEIGHTS))
        tokenizer.save(tmp / TOKENIZER)
        if trainer_state is not None:
            meta, tensors = flatten_state(trainer_state)
            save_file(tensors, str(tmp / STATE_TENSORS))
            _write_json(tmp / STATE_JSON, meta)
        if directory.exists():  # replace: move the old one aside first, drop it only once the new one is in place
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def save_run_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, tokenizer: Tokenizer, *,
                        trainer_state: dict | None = None, keep: int = 2,
                        weights: dict[str, Tensor] | None = None) -> Path:
    """Save ``run_dir/step-NNNNNN``, point ``run_dir/latest`` at it, keep only the newest ``keep`` checkpoints."""
    run_dir = Path(run_dir)
    path = save_checkpoint(run_dir / f"step-{step:06d}", model, tokenizer, trainer_state=trainer_state,
                           weights=weights)
    write_atomic(run_dir / LATEST, (path.name + "\n").encode())
    steps = sorted(p for p in run_dir.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in steps[: max(0, len(steps) - keep)]:
        if old != path:
            shutil.rmtree(old, ignore_errors=True)
    return path


# -- reading ------------------------------------------------------------------------------------------------------
def is_qkv_checkpoint(directory: Path) -> bool:
    """A directory whose config.json says ``"format": "qkv"``, or a run directory with a ``latest`` file."""
    if (directory / LATEST).is_file():
        return True
    try:
        return json.loads((directory / CONFIG).read_text()).get("format") == "qkv"
    except (OSError, ValueError, AttributeError):
        return False


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory itself, or the one a run directory's ``latest`` file names."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass a directory written by `qkv train`")
    if not path.is_dir():
        raise NotADirectoryError(f"checkpoint {path} is a file; pass the directory that holds {CONFIG}, "
                                 f"{WEIGHTS} and {TOKENIZER}")
    if not (path / CONFIG).exists() and (path / LATEST).is_file():
        target = path / (path / LATEST).read_text().strip()
        if not target.is_dir():
            raise FileNotFoundError(f"{path / LATEST} names {target.name}, which is missing; pass one of the "
                                    f"step-* directories in {path} instead")
        return target
    return path


def check_checkpoint_dir(directory: Path, *, need_state: bool = False) -> None:
    """Refuse a directory that lacks a file or holds pickled weights, naming what is wrong and what to do."""
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not (directory / WEIGHTS).is_file():
        raise ValueError(f"{directory} holds pickled weights ({', '.join(pickles)}) and no {WEIGHTS}; qkv loads "
                         "only safetensors, which cannot run code: convert the weights to safetensors first")
    needed = [CONFIG, WEIGHTS, TOKENIZER] + ([STATE_JSON, STATE_TENSORS] if need_state else [])
    missing = [name for name in needed if not (directory / name).is_file()]
    if missing:
        hint = ("; it is not a training checkpoint that can resume: pass a directory written by `qkv train`"
                if need_state and set(missing) <= {STATE_JSON, STATE_TENSORS} else
                "; pass a directory written by `qkv train` (or `qkv.checkpoint.save_checkpoint`)")
        raise FileNotFoundError(f"checkpoint {directory} is missing {', '.join(missing)}{hint}")


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu"):
    """→ (model in eval mode, tokenizer, checkpoint directory). The model is built from config.json."""
    directory = resolve_checkpoint(path)
    check_checkpoint_dir(directory)
    try:
        data = json.loads((directory / CONFIG).read_text())
    except ValueError as err:
        raise ValueError(f"{directory / CONFIG} is not valid JSON ({err}); the checkpoint is damaged") from None
    if data.get("format") != "qkv":
        raise ValueError(f"{directory / CONFIG} is not a qkv config (no \"format\": \"qkv\"); "
                         "load Hugging Face directories with qkv.load")
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{directory} was written by a newer qkv (format_version {data['format_version']} > "
                         f"{FORMAT_VERSION}); upgrade qkv to load it")
    config = ModelConfig.from_dict(data, source=directory / CONFIG)
    model = build_model(config, data.get("model_type")).to(device)
    try:
        weights = load_file(str(directory / WEIGHTS), device=str(device))
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{directory / WEIGHTS} is not a readable safetensors file ({err}); "
                         "the checkpoint is damaged: use an earlier one") from None
    check_finite_weights(weights, directory / WEIGHTS)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{directory / WEIGHTS} does not match {CONFIG}: {str(err).splitlines()[0]} "
                         f"{str(err).splitlines()[1:2]}; the files come from different models") from None
    return model.eval(), Tokenizer.load(directory / TOKENIZER), directory


def load_trainer_state(path: str | Path) -> tuple[dict, Path]:
    """→ (the nested trainer state saved with the checkpoint, the checkpoint directory)."""
    directory = resolve_checkpoint(path)
    check_checkpoint_dir(directory, need_state=True)
    meta = json.loads((directory / STATE_JSON).read_text())
    return unflatten_state(meta, load_file(str(directory / STATE_TENSORS))), directory
