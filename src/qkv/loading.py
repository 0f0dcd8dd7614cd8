"""``qkv.load(DIR)``: a model and its tokenizer from a directory, whichever supported format it holds.

The format is decided by the files found. Each loader is one entry of ``LOADERS``: a test ``(Path) -> bool`` and a
function ``(Path, device) -> Loaded``; the first whose test passes loads the directory (or file).

``quantize="int8" | "int4"`` packs the linear layers for this CPU as the model loads (``qkv.quantize``); a GGUF
file's Q4 blocks become int4 layers as they are.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from .checkpoint import PICKLE_SUFFIXES, is_qkv_checkpoint, load_checkpoint
from .devices import resolve_device
from .interop import is_hf_directory, load_gguf, load_hf
from .quantize import DEFAULT_GROUP_SIZE, check_mode
from .quantize import quantize as quantize_model
from .tokenizers import Tokenizer

__all__ = ["Loaded", "load", "LOADERS"]


class Loaded(NamedTuple):
    """What ``qkv.load`` returns: ``model, tokenizer = qkv.load(DIR)``."""

    model: torch.nn.Module
    tokenizer: Tokenizer


def _load_qkv(path: Path, device: str | torch.device) -> Loaded:
    model, tokenizer, _ = load_checkpoint(path, device=device)
    return Loaded(model, tokenizer)


def _load_hf(path: Path, device: str | torch.device) -> Loaded:
    return Loaded(*load_hf(path, device=device))


def _is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix == ".gguf"


def _load_gguf(path: Path, device: str | torch.device) -> Loaded:
    model, tokenizer = load_gguf(path)
    return Loaded(model.to(device), tokenizer)


# (name, does this loader recognise the directory?, load it)
LOADERS: list[tuple[str, Callable[[Path], bool], Callable[[Path, str | torch.device], Loaded]]] = [
    ("qkv checkpoint", is_qkv_checkpoint, _load_qkv),
    ("Hugging Face GPT-2, BERT or LLaMA directory", is_hf_directory, _load_hf),
    ("GGUF file (LLaMA architecture)", _is_gguf, _load_gguf),
]


def load(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         quantize: str | None = None, group_size: int = DEFAULT_GROUP_SIZE) -> Loaded:
    """Load a qkv checkpoint (a ``step-*`` directory or a training run directory), a Hugging Face directory or a
    GGUF file → ``Loaded(model, tokenizer)``. ``dtype`` (e.g. ``torch.bfloat16``) casts the model after loading.

    ``quantize`` ("int8" | "int4", ``group_size`` inputs an int4 group) swaps every linear layer for a weight-only
    quantized one on the CPU (``qkv.quantize.quantize``), from the weights as stored, before ``dtype`` casts the
    rest; a GGUF file's Q4_0 / Q4_1 tensors become int4 layers without a round trip through floats."""
    path = Path(path)
    device = resolve_device(device)  # a device this torch lacks is one clear error, before any file is read
    if not path.exists():
    if quantize is not None:
        check_mode(quantize)
        if torch.device(device).type != "cpu":
            raise ValueError(f"quantize={quantize!r} packs weights for the CPU's kernels, but device={str(device)!r}; "
                             "load on the CPU (device='cpu'), or without quantize")
        raise FileNotFoundError(f"{path} does not exist; pass a checkpoint directory (e.g. one `qkv train` wrote)")
    for _, recognises, loader in LOADERS:
        if recognises(path):
            if quantize is not None and loader is _load_gguf:
                model, tokenizer = load_gguf(path, quantize=quantize, group_size=group_size)
            else:
                model, tokenizer = loader(path, device)
            if quantize is not None:
                quantize_model(model, quantize, group_size=group_size)
            return Loaded(model if dtype is None else model.to(dtype), tokenizer)
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is a file; pass the directory that holds config.json and the weights "
                                 "(or a .gguf file)")
    found = sorted(p.name for p in path.iterdir())[:8]
    pickles = [name for name in found if name.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ValueError(f"{path} holds pickled weights ({', '.join(pickles)}); qkv loads only safetensors, which "
                         "cannot run code: convert the weights to model.safetensors first")
    config = path / "config.json"
    if config.is_file():  # no loader could read what kind of model it describes: say why, not "unsupported"
        try:
            json.loads(config.read_text(encoding="utf-8"))
        except ValueError as err:
            raise ValueError(f"{config} is not valid JSON ({err}); the checkpoint is damaged: use an earlier one, "
                             "or restore config.json") from None
    known = ", ".join(name for name, _, _ in LOADERS)
    raise ValueError(f"{path} is not a checkpoint qkv can load (found: {', '.join(found) or 'nothing'}); "
                     f"supported: {known}")
