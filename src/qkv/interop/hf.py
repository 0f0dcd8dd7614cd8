"""What every Hugging Face format shares: ``config.json``, weight files, and tensor-by-tensor mapping rules.

A Hugging Face model directory holds ``config.json`` (whose ``model_type`` names the architecture) and its
weights as ``model.safetensors`` (possibly sharded, with ``model.safetensors.index.json``) or, in older uploads,
``pytorch_model.bin``. A ``.bin`` is a pickle: qkv reads it only with ``torch.load(weights_only=True)``, which
refuses anything but plain tensors, so loading a file can never run code.

The architecture modules (``gpt2``, ``bert``) describe their tensors as a list of ``Rule``s; the functions here
apply the rules in either direction and check every shape on the way.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..models import Embeddings, check_finite_weights, positional_encoding, unwrap

__all__ = [
    "Rule",
    "read_config",
    "load_weights",
    "save_weights",
    "strip_prefix",
    "to_qkv_state_dict",
    "from_qkv_state_dict",
    "build_with_weights",
    "layer_rules",
    "matches",
    "model_type_of",
    "check_exportable",
    "write_hf_directory",
    "model_to_save",
    "decoder_to_save",
    "WEIGHT_FILES",
]

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


@dataclass(frozen=True)
class Rule:
    """One qkv tensor made of one or more Hugging Face tensors, stacked along dim 0 (rows = outputs).

    ``transpose``: GPT-2's ``Conv1D`` stores W as (in, out) and computes x W + b, where ``nn.Linear`` stores W^T
    as (out, in) and computes x W^T + b; its tensors are transposed on the way in and out.
    ``rows``: how many rows each Hugging Face tensor gives, when they differ (grouped-query attention's W_Q is
    larger than its W_K and W_V); by default the rows are shared equally.
    """

    qkv: str
    hf: tuple[str, ...]
    transpose: bool = False
    rows: tuple[int, ...] | None = None

    def split(self, n_rows: int) -> list[int]:
        """The rows each Hugging Face tensor gives to a qkv tensor of ``n_rows`` rows."""
        return list(self.rows) if self.rows is not None else [n_rows // len(self.hf)] * len(self.hf)


def read_config(directory: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a model directory, with an error naming what is missing or broken."""
    directory = Path(directory)
    if not directory.is_dir():
        raise NotADirectoryError(f"{directory} is not a directory; pass the folder that holds config.json")
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no config.json; a Hugging Face model directory needs "
                                "config.json next to its weights (save it with model.save_pretrained(DIR))")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); restore the file from the model's source") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(config).__name__}")
    return config


def _load_bin(path: Path) -> dict[str, Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).splitlines()[0] if str(err) else "it holds objects other than tensors"
        raise ValueError(
            f"{path.name} needs full unpickling, which can run arbitrary code, so qkv refuses it "
            f"(torch.load(weights_only=True) said: {reason}); convert it once, in an environment you trust, "
            "to model.safetensors, e.g. transformers' model.save_pretrained(DIR, safe_serialization=True)"
        ) from None


def load_weights(directory: str | Path) -> dict[str, Tensor]:
    """All tensors of a model directory: ``model.safetensors`` (sharded or not), else ``pytorch_model.bin``."""
    from safetensors.torch import load_file

    directory = Path(directory)
    single, index, binary = (directory / name for name in WEIGHT_FILES)
    if single.is_file():
        return load_file(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index.name} lists shard(s) missing from {directory}: {', '.join(missing)}")
        weights: dict[str, Tensor] = {}
        for shard in shards:
            weights.update(load_file(directory / shard))
        return weights
    if binary.is_file():
        weights = _load_bin(binary)
        if not isinstance(weights, Mapping) or not all(isinstance(v, Tensor) for v in weights.values()):
            raise ValueError(f"{binary} does not hold a state dict (a mapping of names to tensors)")
        return dict(weights)
    raise FileNotFoundError(f"{directory} has no weights: expected one of {', '.join(WEIGHT_FILES)}")


def save_weights(tensors: Mapping[str, Tensor], path: str | Path) -> None:
    """Write tensors as safetensors with the ``format: pt`` metadata transformers expects."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def strip_prefix(weights: Mapping[str, Tensor], prefixes: Iterable[str]) -> dict[str, Tensor]:
    """Drop the task-model prefix (``transformer.``, ``bert.``) so base-model and head-model files read alike."""
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in weights):
            return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in weights.items()}
    return dict(weights)


def _fmt(shape: Iterable[int]) -> str:
    return "(" + ", ".join(str(n) for n in shape) + ")"


def to_qkv_state_dict(weights: Mapping[str, Tensor], rules: list[Rule], expected: Mapping[str, torch.Size],
                      *, ignore: Callable[[str], bool], source: str, dtype: torch.dtype | None) -> dict[str, Tensor]:
    """Hugging Face tensors → a qkv state dict, checking that every tensor is used once with the right shape.

    ``expected`` holds the qkv shapes that the config implies; ``ignore`` says which leftover tensors are not
    parameters qkv needs (buffers, heads); any other leftover is an error.
    """
    state: dict[str, Tensor] = {}
    used: set[str] = set()
    for rule in rules:
        target = expected[rule.qkv]
        parts = []
        for name, rows in zip(rule.hf, rule.split(target[0]), strict=True):
            piece = (rows, *target[1:])
            piece = tuple(reversed(piece)) if rule.transpose else piece
            if name not in weights:
                raise ValueError(f"{source}: tensor {name!r} is missing; the file does not hold a complete "
                                 "model of the architecture config.json describes")
            tensor = weights[name]
            if tuple(tensor.shape) != piece:
                raise ValueError(f"{source}: tensor {name!r} has shape {_fmt(tensor.shape)} but config.json "
                                 f"implies {_fmt(piece)}; the weights and config.json belong to different models")
            parts.append(tensor.T if rule.transpose else tensor)
            used.add(name)
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        state[rule.qkv] = tensor.to(dtype).contiguous() if dtype is not None else tensor.contiguous()
    extra = sorted(k for k in weights if k not in used and not ignore(k))
    if extra:
        shown = ", ".join(repr(k) for k in extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise ValueError(f"{source}: unexpected tensor(s) {shown}; qkv does not know where they belong, so the "
                         "file is not a plain model of the architecture config.json names")
    return state


def from_qkv_state_dict(state: Mapping[str, Tensor], rules: list[Rule]) -> dict[str, Tensor]:
    """A qkv state dict → Hugging Face tensors, undoing ``to_qkv_state_dict``."""
    out: dict[str, Tensor] = {}
    for rule in rules:
        tensor = state[rule.qkv]
        for name, part in zip(rule.hf, tensor.split(rule.split(tensor.shape[0]), dim=0), strict=True):
            out[name] = (part.T if rule.transpose else part).contiguous()
    return out


def build_with_weights(model_class: Callable[[Any], nn.Module], config: Any,
                       weights: Mapping[str, Tensor], rules: list[Rule], *, ignore: Callable[[str], bool],
                       source: str, dtype: torch.dtype | None = torch.float32) -> nn.Module:
    """Build the qkv model on the meta device (no memory, no random init) and put the mapped tensors in it."""
    with torch.device("meta"):
        model = model_class(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state = to_qkv_state_dict(weights, rules, expected, ignore=ignore, source=source, dtype=dtype)
    check_finite_weights(state, source)
    model.load_state_dict(state, strict=True, assign=True)
    for module in model.modules():  # position tables (RoPE's cos/sin, ...) are computed, not stored: compute them
        if isinstance(module, Embeddings) and any(b.is_meta for b in module.positional.buffers()):
            module.positional = positional_encoding(config)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left unfilled after loading: {', '.join(left)}")
    return model.eval()


def layer_rules(n_layers: int, per_layer: Callable[[int], list[Rule]]) -> list[Rule]:
    """The per-layer rules for every layer, in order."""
    return [rule for i in range(n_layers) for rule in per_layer(i)]


def matches(*patterns: str) -> Callable[[str], bool]:
    """A predicate: does a tensor name fully match one of these regular expressions."""
    compiled = [re.compile(p) for p in patterns]
    return lambda name: any(c.fullmatch(name) for c in compiled)


def model_type_of(config: Mapping[str, Any], directory: Path, supported: Iterable[str]) -> str:
    """config.json's ``model_type``, checked against the architectures qkv can read."""
    supported = tuple(supported)
    kind = config.get("model_type")
    if kind not in supported:
        raise ValueError(f"{directory / 'config.json'}: model_type={kind!r} is an architecture qkv does not "
                         f"support; qkv reads Hugging Face model_type {' or '.join(map(repr, supported))}")
    return kind


def check_exportable(config: Any, architecture: str, needed: Mapping[str, Any], ending: str) -> None:
    """Refuse, naming the field, a config with an option ``architecture`` cannot express: each of ``needed`` must
    hold, and the model must end with a final norm (``ending`` says which one the architecture has)."""
    for field, value in needed.items():
        if getattr(config, field) != value:
            raise ValueError(f"cannot save as {architecture}: {field}={getattr(config, field)!r}, but {architecture} "
                             f"has {field}={value!r}; build the model with {field}={value!r} to export it")
    if not config.use_final_norm:
        raise ValueError(f"cannot save as {architecture}: final_norm=False, but {architecture} ends with {ending}; "
                         "build the model with final_norm=True (or None with norm_position='pre') to export it")


def write_hf_directory(directory: str | Path, hf_config: Mapping[str, Any], tensors: Mapping[str, Tensor],
                       tokenizer: Any = None) -> Path:
    """What ``from_pretrained(DIR)`` reads: ``config.json``, ``model.safetensors`` and, given a tokenizer, its
    ``tokenizer.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(tensors, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(directory / "tokenizer.json")
    return directory


def decoder_to_save(model: nn.Module, architecture: str, merged: str) -> nn.Module:
    """:func:`model_to_save` for a format that holds a decoder-only language model (GPT-2, LLaMA): anything else
    is refused first with a TypeError naming ``architecture``."""
    if unwrap(model).model_type != "decoder":
        raise TypeError(f"cannot save a {type(unwrap(model)).__name__} as {architecture}: {architecture} is a "
                        "decoder-only language model (qkv.DecoderLM)")
    return model_to_save(model, merged)


def model_to_save(model: nn.Module, merged: str) -> nn.Module:
    """The qkv model whose weights a save writes: the one inside torch.compile, DDP or FSDP (their prefixes are
    not part of a checkpoint). peft adapters are refused in one line naming ``merged``, the call that saves the
    merged model: their layers rename the base weights, and a full copy of a base is not how adapters are kept
    (peft's ``model.save_pretrained(DIR)`` writes them alone)."""
    core = unwrap(model)
    adapted = [name for name, module in core.named_modules() if type(module).__module__.split(".")[0] == "peft"]
    if adapted:
        raise ValueError(f"the model carries peft adapters ({adapted[0]}{', ...' if len(adapted) > 1 else ''}); "
                         f"merge them into the weights to save a standalone model: {merged}, or keep the adapters "
                         "alone with peft's model.save_pretrained(DIR)")
    return core
