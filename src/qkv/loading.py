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

__all__ = ["Loaded", "load", "LOADERS", "describe_base", "find_base", "is_adapter_run", "save_adapter_checkpoint",
           "load_adapter_run", "ADAPTER_BASE"]


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
         quantize: str | None = None, group_size: int = DEFAULT_GROUP_SIZE, output: str = "int8") -> Loaded:
    """Load a qkv checkpoint (a ``step-*`` directory or a training run directory), a Hugging Face directory or a
    GGUF file → ``Loaded(model, tokenizer)``. ``dtype`` (e.g. ``torch.bfloat16``) casts the model after loading.

    ``quantize`` ("int8" | "int4", ``group_size`` inputs an int4 group; the output layer int8 unless ``output`` says
    "int4"; a LoRA run's adapters merged into its base first, in memory) swaps every linear layer for a
    weight-only quantized one on the CPU (``qkv.quantize.quantize``), from
    the weights as stored, before ``dtype`` casts the rest; a GGUF file's Q4_0 / Q4_1 tensors become int4 layers
    without a round trip through floats."""
    path = Path(path)
    device = resolve_device(device)  # a device this torch lacks is one clear error, before any file is read
    if quantize is not None:
        check_mode(quantize)
        if torch.device(device).type != "cpu":
            raise ValueError(f"quantize={quantize!r} packs weights for the CPU's kernels, but device={str(device)!r}; "
                             "load on the CPU (device='cpu'), or without quantize")
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a checkpoint directory (e.g. one `qkv train` wrote)")
    for _, recognises, loader in LOADERS:
        if recognises(path):
            if quantize is not None and loader is _load_gguf:
                model, tokenizer = load_gguf(path, quantize=quantize, group_size=group_size, output=output)
            else:
                model, tokenizer = loader(path, device)
            if quantize is not None:
                if hasattr(model, "peft_config"):  # a LoRA run: quantize an inference copy with the adapters merged
                    with torch.no_grad():
                        model = model.merge_and_unload()
                quantize_model(model, quantize, group_size=group_size, output=output)
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


# -- LoRA runs: adapters saved alone, put back on the base they were trained from ---------------------------------
ADAPTER_BASE = "base_model.json"  # the base a LoRA checkpoint's adapters belong to: name, sha256, where to find it
_DIGESTS: dict[tuple[str, int, int], str] = {}


def _package_of(path: Path) -> tuple[str, str, str] | None:
    """(distribution, version, path inside site-packages) of a file an installed package put there, else None."""
    import importlib.metadata

    parts = path.parts
    for i, part in enumerate(parts[:-1]):
        if part in ("site-packages", "dist-packages"):
            inside = Path(*parts[i + 1:])
            for dist in importlib.metadata.packages_distributions().get(parts[i + 1], []):
                return dist, importlib.metadata.version(dist), inside.as_posix()
    return None


def _digest(path: Path) -> str:
    """The sha256 of a file; of a directory, the sha256 of its files' names and sha256s (hidden files aside)."""
    from .checkpoint import sha256_of

    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _DIGESTS:
        if path.is_file():
            _DIGESTS[key] = sha256_of(path)
        else:
            import hashlib

            files = sorted(p for p in path.rglob("*") if p.is_file() and not any(
                s.startswith(".") for s in p.relative_to(path).parts))
            listing = "".join(f"{p.relative_to(path).as_posix()}\0{sha256_of(p)}\n" for p in files)
            _DIGESTS[key] = hashlib.sha256(listing.encode()).hexdigest()
    return _DIGESTS[key]


def describe_base(path: str | Path) -> dict:
    """How a fine-tuning run records the model it started from: ``name`` (the file's own name, or the package that
    installed it and its version), ``sha256`` (of the file; of a directory, of its files' sha256s), and where to
    find it: ``path`` (absolute) for a file of the user's, or ``package`` + ``file`` for one an installed package
    holds (never a virtual environment's path, which another machine or venv does not have). A run directory is
    recorded as the checkpoint its ``latest`` names."""
    from .checkpoint import resolve_checkpoint

    path = Path(path)
    if path.is_dir() and is_qkv_checkpoint(path):
        path = resolve_checkpoint(path)
    path = path.resolve()
    record = {"name": path.name, "sha256": _digest(path)}
    package = _package_of(path)
    if package is None:
        return {**record, "path": str(path)}
    dist, version, inside = package
    return {**record, "name": f"{dist}=={version}:{path.name}", "package": f"{dist}=={version}", "file": inside}


def find_base(record: dict, source: str | Path) -> Path:
    """The base model a run recorded (``describe_base``), found again and checked by its sha256; one line naming
    it (and ``source``, the run) when it is gone or changed."""
    import site
    import sys

    candidates = [Path(record["path"])] if record.get("path") else []
    if record.get("file"):
        roots = [*site.getsitepackages(), site.getusersitepackages(), *sys.path]
        candidates += [Path(root) / record["file"] for root in roots if root]
    found = next((p for p in candidates if p.exists()), None)
    where = record.get("path") or f"the package {record.get('package')} ({record.get('file')})"
    if found is None:
        how = f"pip install {record['package']}" if record.get("package") else f"put it back at {where}"
        raise FileNotFoundError(f"{source} adapts the base model {record['name']} (sha256 {record['sha256'][:12]}), "
                                f"which is not at {where} any more; {how}")
    if _digest(found) != record["sha256"]:
        raise ValueError(f"{found} is not the base model {source} was trained from (its sha256 is "
                         f"{_digest(found)[:12]}, the run recorded {record['sha256'][:12]}); put the original back")
    return found


def is_adapter_run(path: str | Path) -> bool:
    """A checkpoint (or a run directory whose latest checkpoint) holds LoRA adapters (peft's adapter_config.json)."""
    from .checkpoint import ADAPTER_CONFIG, resolve_checkpoint

    try:
        return Path(path).is_dir() and (resolve_checkpoint(path) / ADAPTER_CONFIG).is_file()
    except (OSError, ValueError):
        return False


def save_adapter_checkpoint(directory: str | Path, model: torch.nn.Module, tokenizer: Tokenizer, *,
                            trainer_state: dict | None = None, weights: dict | None = None, base: dict) -> Path:
    """A LoRA run's checkpoint (``qkv.checkpoint.save_checkpoint``'s signature, with ``base``: its
    ``describe_base`` record): peft's ``adapter_model.safetensors`` (the adapter weights alone) and
    ``adapter_config.json`` (its ``base_model_name_or_path`` the base's path, or its name when a package holds it),
    ``base_model.json`` (the base's name, sha256 and where to find it), the model's ``config.json`` (the layout the
    adapters sit on), the tokenizer and the trainer state; never a copy of the base. Written atomically with a
    manifest (``qkv.checkpoint.write_directory``)."""
    import copy

    from safetensors.torch import save

    from .checkpoint import (
        ADAPTER_WEIGHTS,
        CONFIG,
        STATE_JSON,
        STATE_TENSORS,
        TOKENIZER,
        flatten_state,
        write_directory,
    )
    from .extras import require
    from .models import unwrap

    peft = require("peft", "LoRA adapters")
    core = unwrap(model)
    config = copy.deepcopy(model.peft_config["default"])
    config.base_model_name_or_path = base.get("path") or base["name"]
    config.inference_mode = True
    tensors = peft.get_peft_model_state_dict(model, save_embedding_layers=False)
    with write_directory(directory) as tmp:
        core.config.save(tmp / CONFIG, model_type=core.model_type)
        (tmp / ADAPTER_WEIGHTS).write_bytes(save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))
        config.save_pretrained(str(tmp))
        (tmp / ADAPTER_BASE).write_text(json.dumps(base, indent=2) + "\n")
        tokenizer.save(tmp / TOKENIZER)
        if trainer_state is not None:
            meta, state_tensors = flatten_state(trainer_state)
            (tmp / STATE_TENSORS).write_bytes(save(state_tensors))
            (tmp / STATE_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(directory)


def load_adapter_run(path: str | Path, *, device: str | torch.device = "cpu", trainable: bool = False) -> Loaded:
    """A LoRA run's checkpoint → ``Loaded(base + adapters as a peft model, tokenizer)``: the base found by its
    record and checked by sha256, rebuilt in the layout the adapters sit on, the adapters loaded with no key
    missing or unexpected (else one line naming them). ``trainable``: the adapters train, the base stays frozen
    (a resumed run); otherwise the model is in eval mode, nothing trainable."""
    import warnings

    from safetensors.torch import load_file

    from .checkpoint import (
        ADAPTER_WEIGHTS,
        CONFIG,
        TOKENIZER,
        check_checkpoint_dir,
        read_manifest,
        resolve_checkpoint,
        verify_files,
    )
    from .config import ModelConfig
    from .extras import require
    from .models import build_model

    peft = require("peft", "LoRA adapters")
    directory = resolve_checkpoint(path)
    check_checkpoint_dir(directory)
    manifest = read_manifest(directory)
    verify_files(directory, [CONFIG, ADAPTER_BASE, "adapter_config.json", ADAPTER_WEIGHTS, TOKENIZER], manifest)
    base_path = find_base(json.loads((directory / ADAPTER_BASE).read_text()), directory)
    base, _ = load(base_path, device=device)
    data = json.loads((directory / CONFIG).read_text())
    model = build_model(ModelConfig.from_dict(data, source=directory / CONFIG), data.get("model_type")).to(device)
    model.load_state_dict(base.state_dict())  # in the adapters' layout (q, k, v modules for a LoRA on parts)
    del base
    lora = peft.LoraConfig.from_pretrained(str(directory))
    lora.inference_mode = not trainable
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():  # a fresh initialisation, overwritten
        warnings.simplefilter("ignore")  # peft warns that a qkv model has no Hugging Face name to record
        adapted = peft.get_peft_model(model, lora)
    result = peft.set_peft_model_state_dict(adapted, load_file(str(directory / ADAPTER_WEIGHTS), device=str(device)))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        what = "; ".join(f"{label} {keys[0]}{' and others' if len(keys) > 1 else ''}" for label, keys in
                         (("missing", missing), ("unexpected", result.unexpected_keys)) if keys)
        raise ValueError(f"{directory / ADAPTER_WEIGHTS} does not fit its adapter_config.json ({what}); the "
                         "checkpoint is damaged: use an earlier one")
    return Loaded(adapted.train() if trainable else adapted.eval(), Tokenizer.load(directory / TOKENIZER))


def _load_adapter_run(path: Path, device: str | torch.device) -> Loaded:
    return load_adapter_run(path, device=device)


LOADERS.insert(0, ("qkv LoRA run (its base model with the adapters)", is_adapter_run, _load_adapter_run))
