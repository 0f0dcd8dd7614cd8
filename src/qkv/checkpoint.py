"""Checkpoints: a directory of plain files, written atomically, never a pickle.

A qkv checkpoint directory holds

- ``config.json``: the ``ModelConfig`` fields plus ``"format": "qkv"``, ``format_version`` and ``model_type``;
- ``model.safetensors``: the model's ``state_dict``;
- ``tokenizer.json``: the Hugging Face ``tokenizers`` file;
- for training runs, ``trainer_state.json`` (step, schedule, data position, RNG states, options) and
  ``trainer_state.safetensors`` (the optimizer's moment tensors and the torch RNG states);
- ``manifest.json``: each file's sha256 and size, written by :func:`write_directory` (the one writer every qkv
  directory goes through) and checked by every reader (``CheckpointDamaged`` names a file that changed since);
  a checkpoint written before manifests loads unchecked. Every field of config.json and trainer_state.json is
  checked by name and type before use (``ModelConfig``, ``TrainerState``).

A training run directory holds checkpoints ``step-000100/``, ``step-000200/``, ... and a file ``latest`` naming
the newest one; every path that takes a checkpoint also takes the run directory. A checkpoint is written into a
temporary directory and renamed into place, and ``latest`` is replaced by rename too, so a crash mid-write leaves
the previous checkpoint as it was. Files and folders get the modes the umask gives (0644 / 0755 under umask 022).

One process at a time trains in a run directory: :func:`claim_run_directory` holds the lock file ``.lock``
(``filelock``; the kernel drops it when its process dies, so a killed run's lock is simply taken over) and names
its holder in ``.lock-owner``; claiming also puts back a checkpoint whose replacement never arrived and deletes
the ``.*.tmp`` leftovers of a killed save. ``QKV_FAULT=<point>[@N]`` (tests only) makes the process exit at once,
as SIGKILL would, the N-th time it reaches a named point (:data:`FAULT_POINTS`).

:func:`average_checkpoints` averages the weights of a run's newest checkpoints (the paper's last-5 average).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import Tensor

from .config import FORMAT_VERSION, ConfigFileHeader, ModelConfig, check_fields
from .interop.hf import model_to_save
from .models import build_model, check_finite_weights
from .tokenizers import Tokenizer

__all__ = ["CONFIG", "WEIGHTS", "TOKENIZER", "STATE_JSON", "STATE_TENSORS", "PICKLE_SUFFIXES", "save_checkpoint",
           "save_run_checkpoint", "write_atomic", "resolve_checkpoint", "check_checkpoint_dir", "load_checkpoint",
           "load_trainer_state", "flatten_state", "unflatten_state", "is_qkv_checkpoint", "claim_run_directory",
           "run_directory_of", "read_run_info", "RunDirectoryInUse", "CheckpointNotSaved", "fault_point",
           "FAULT_POINTS", "average_checkpoints", "is_run_directory", "run_to_resume",
           "MANIFEST", "write_directory", "sha256_of", "read_manifest", "verify_files", "CheckpointDamaged",
           "TrainerState", "RunInfo", "read_trainer_state_json", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS"]

CONFIG, WEIGHTS, TOKENIZER = "config.json", "model.safetensors", "tokenizer.json"
STATE_JSON, STATE_TENSORS = "trainer_state.json", "trainer_state.safetensors"
LATEST = "latest"
LOCK, LOCK_OWNER = ".lock", ".lock-owner"
MANIFEST = "manifest.json"  # each file's sha256 and size, written by write_directory, verified on load
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


# -- faults, for the tests that prove a run survives any kill ---------------------------------------------------
FAULT_ENV = "QKV_FAULT"
FAULT_EXIT_STATUS = 137  # what a shell reports for SIGKILL
FAULT_POINTS = ("save:mid", "save:before-rename", "save:after-rename", "metrics:before-row")
_fault_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Exit at once (``os._exit``: no cleanup, no flush) when ``$QKV_FAULT`` is ``name`` or ``name@N`` and this is
    the N-th time (default 1st) the process reaches ``name``. Unset, it costs one dictionary look-up."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition("@")
    if point != name:
        return
    _fault_hits[name] = _fault_hits.get(name, 0) + 1
    if _fault_hits[name] == int(nth or 1):
        os._exit(FAULT_EXIT_STATUS)


# -- writing ------------------------------------------------------------------------------------------------------
class CheckpointNotSaved(RuntimeError):
    """Writing a checkpoint failed (a full disk, a quota); the message says which checkpoint the run kept."""


def _temporary_name(path: Path) -> Path:
    """A fresh hidden sibling ``.NAME.<random>.tmp``: what :func:`claim_run_directory` deletes if left behind."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it: a crash never leaves half a file.

    The file is created like any other (mode 0666 less the umask), not with a temporary file's private 0600."""
    tmp = _temporary_name(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _save_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    """A safetensors file written as bytes by Python: mode 0666 less the umask (safetensors' own writer makes it
    0600), and a full disk is an ``OSError`` like any other write's."""
    path.write_bytes(save(tensors))


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def sha256_of(path: str | Path) -> str:
    """The hex sha256 of a file's bytes, read in chunks (a 270 MB file never sits in memory whole)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _manifest_of(folder: Path) -> dict:
    files = {p.relative_to(folder).as_posix(): {"sha256": sha256_of(p), "bytes": p.stat().st_size}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST}
    return {"format": "qkv-manifest", "version": 1, "algorithm": "sha256", "files": files}


@contextlib.contextmanager
def write_directory(directory: str | Path) -> Iterator[Path]:
    """The one way qkv writes a directory of files (a checkpoint; adapters and exports go through it too):
    atomically, with a manifest of every file's sha256 that loading verifies.

    ``with write_directory(DIR) as tmp:`` the caller writes its files into ``tmp``, a fresh temporary sibling of
    DIR (mode 0777 less the umask, not a temporary folder's private 0700). When the block ends, ``manifest.json``
    records each file's sha256 and size, and ``tmp`` is renamed to DIR; a DIR already there is set aside first and
    deleted only once the new one is in place. An exception removes ``tmp`` and leaves DIR as it was; so does a
    kill, whose leftover ``.*.tmp`` folder the next claim of the run deletes (``claim_run_directory``)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(directory)
    tmp.mkdir()
    try:
        yield tmp
        _write_json(tmp / MANIFEST, _manifest_of(tmp))
        fault_point("save:before-rename")
        if directory.exists():  # replace: move the old one aside first, drop it only once the new one is in place
            old = _set_aside(directory)
            _remove(old)
            os.replace(directory, old)
            os.replace(tmp, directory)
            _remove(old)
        else:
            os.replace(tmp, directory)
    except BaseException:
        _remove(tmp)
        raise


def save_checkpoint(directory: str | Path, model: torch.nn.Module, tokenizer: Tokenizer, *,
                    trainer_state: dict | None = None, weights: dict[str, Tensor] | None = None) -> Path:
    """Write a checkpoint directory atomically, with its manifest (``write_directory``).

    ``weights``: the tensors to write when ``model.state_dict()`` does not hold them whole (a sharded model).
    A model wrapped by torch.compile, DDP or FSDP is saved as the qkv model inside (its own tensor names); one
    with peft adapters is refused, naming the fix (save ``model.merge_and_unload()``, or the adapters alone)."""
    model = model_to_save(model, "save_checkpoint(DIR, model.merge_and_unload(), tokenizer)")
    directory = Path(directory)
    with write_directory(directory) as tmp:
        model.config.save(tmp / CONFIG, model_type=model.model_type)
        weights = model.state_dict() if weights is None else weights
        _save_tensors({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / WEIGHTS)
        fault_point("save:mid")
        tokenizer.save(tmp / TOKENIZER)
        if trainer_state is not None:
            meta, tensors = flatten_state(trainer_state)
            _save_tensors(tensors, tmp / STATE_TENSORS)
            _write_json(tmp / STATE_JSON, meta)
    return directory


def _set_aside(directory: Path) -> Path:
    """Where a checkpoint waits while its replacement is renamed in (claiming the run puts it back if need be)."""
    return directory.with_name(f".{directory.name}.old")


def save_run_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, tokenizer: Tokenizer, *,
                        trainer_state: dict | None = None, keep: int = 2,
                        weights: dict[str, Tensor] | None = None, writer=None) -> Path:
    """Save ``run_dir/step-NNNNNN``, point ``run_dir/latest`` at it, keep only the newest ``keep`` checkpoints.
    ``writer``: what writes the checkpoint (``save_checkpoint``'s signature; default ``save_checkpoint``)."""
    run_dir = Path(run_dir)
    target = run_dir / f"step-{step:06d}"
    try:
        path = (writer or save_checkpoint)(target, model, tokenizer, trainer_state=trainer_state, weights=weights)
        fault_point("save:after-rename")
        write_atomic(run_dir / LATEST, (path.name + "\n").encode())
    except OSError as err:
        kept = _latest_or_newest(run_dir)
        what = (f"the run is kept as it was at {kept}: free some space, then continue it with --resume {run_dir}"
                if kept is not None else "no checkpoint of this run was kept: free some space and start it again")
        raise CheckpointNotSaved(f"could not save checkpoint {target} ({err.strerror or err}); {what}") from None
    steps = sorted(p for p in run_dir.glob("step-*") if p.is_dir())
    for old in steps[: max(0, len(steps) - keep)]:
        if old != path:  # renamed first, so a kill mid-delete leaves a .tmp folder, never half a checkpoint
            doomed = _temporary_name(old)
            os.replace(old, doomed)
            _remove(doomed)
    return path


# -- the run directory: one process at a time ---------------------------------------------------------------------
class RunDirectoryInUse(ValueError):
    """Another live process holds the run directory's lock."""


def run_directory_of(path: str | Path) -> Path:
    """The run directory of a checkpoint (its parent) or of a run directory (itself)."""
    path = Path(path)
    return path.parent if (path / CONFIG).is_file() else path


def _owner_of(run_dir: Path) -> str:
    try:
        owner = json.loads((run_dir / LOCK_OWNER).read_text())
        return f"process {owner['pid']} on {owner['host']} (since {owner['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _tidy(run_dir: Path) -> None:
    """Undo what a killed save left: a checkpoint set aside comes back if its replacement never arrived, and
    unfinished ``.*.tmp`` files and folders are deleted."""
    for entry in run_dir.glob(".step-*.old"):
        target = run_dir / entry.name[1:-len(".old")]
        if target.exists():
            _remove(entry)
        else:
            os.replace(entry, target)
    for entry in run_dir.glob(".*.tmp"):
        _remove(entry)


def _previous_run(run_dir: Path) -> list[Path]:
    if not run_dir.is_dir():
        return []
    return [p for p in (run_dir / LATEST, *run_dir.glob("step-*")) if p.exists()]


def _saved_checkpoints(run_dir: Path) -> list[Path]:
    """What a run saved: ``latest``, its ``step-*`` checkpoints, one set aside mid-save (``.step-*.old``)."""
    return [*_previous_run(run_dir), *run_dir.glob(".step-*.old")] if run_dir.is_dir() else []


def is_run_directory(path: str | Path) -> bool:
    """A directory a qkv training run wrote: checkpoints (``latest``, ``step-*``), or what a run killed before its
    first save leaves (its lock, its ``metrics.csv``)."""
    path = Path(path)
    return path.is_dir() and (bool(_saved_checkpoints(path)) or
                              any((path / name).is_file() for name in (LOCK, LOCK_OWNER, "metrics.csv")))


RESUME_TAKES = "--resume takes a run directory written by qkv train (or one of its step-* checkpoints)"


def run_to_resume(path: str | Path, out_dir: str | Path | None = None) -> Path:
    """The run directory that continuing ``path`` (a run directory or one of its checkpoints) trains in:
    ``out_dir`` if given, else the run's own. Anything else is refused in one line before anything is written:
    a path that does not exist, a file, a directory that is not a qkv run, a checkpoint outside a run directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; {RESUME_TAKES}")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is a file, not a qkv training run; {RESUME_TAKES}")
    checkpoint = (path / CONFIG).is_file()
    if not checkpoint and not is_run_directory(path):
        raise ValueError(f"not a qkv training run: no {STATE_JSON}, {LATEST} or step-* checkpoint in {path}; "
                         f"{RESUME_TAKES}")
    if not checkpoint and not _saved_checkpoints(path):
        raise FileNotFoundError(f"run directory {path} holds no checkpoint yet (the run stopped before its first "
                                "save); start it again: the same command without --resume")
    if out_dir is not None:
        return Path(out_dir)
    if checkpoint and not is_run_directory(path.parent):
        raise ValueError(f"{path} is a checkpoint outside a run directory, and its run would write beside it in "
                         f"{path.parent}; pass --out NEW_DIR to continue it there")
    return path.parent if checkpoint else path


def _check_claimable(run_dir: Path, *, resuming: bool) -> None:
    """Refuse, before anything is written, a path no run may claim: a file, or a directory holding other things
    and no qkv run (a run owns only a directory it creates or finds empty)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"{run_dir} is a file, not a qkv training run; {RESUME_TAKES}" if resuming else
                                 f"{run_dir} is a file; --out takes a directory: pick a new or empty one")
    if run_dir.is_dir() and not is_run_directory(run_dir) and any(run_dir.iterdir()):
        raise ValueError(f"{run_dir} holds other files and no qkv training run; pick a new or empty --out")


@contextlib.contextmanager
def claim_run_directory(run_dir: str | Path, *, overwrite: bool = False, resuming: bool = False,
                        primary: bool = True) -> Iterator[Path]:
    """Hold ``run_dir`` for this process while the ``with`` block trains in it.

    Only a run directory (``is_run_directory``), or one this claim creates or finds empty, is claimed: a file or
    a directory of other things is refused before anything is written to it. The lock file exists while the run
    holds the directory and is removed when it ends.

    A directory another live process holds is refused with one line naming that process (pid, host); a lock
    left by a killed process is taken over. A new run (``resuming=False``) refuses a directory that holds a run
    unless ``overwrite``, which deletes its checkpoints and metrics. ``primary=False`` (the other processes under
    torchrun) only checks: the first process holds the directory for all of them.

    Raises ``RunDirectoryInUse`` or ``ValueError`` (a run is there and ``overwrite`` is off).
    """
    from filelock import FileLock, Timeout

    run_dir = Path(run_dir)
    _check_claimable(run_dir, resuming=resuming)
    if not primary:
        if not resuming and not overwrite and _previous_run(run_dir):
            raise _run_exists(run_dir)
        yield run_dir
        return
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir / LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RunDirectoryInUse(f"{run_dir} is in use by {_owner_of(run_dir)}, which is training in it; wait for "
                                "it to finish or stop it, or pick another --out") from None
    try:
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        write_atomic(run_dir / LOCK_OWNER, (json.dumps(owner) + "\n").encode())
        _tidy(run_dir)
        previous = _previous_run(run_dir)
        if previous and not resuming:
            if not overwrite:
                raise _run_exists(run_dir)
            for path in (*previous, run_dir / "metrics.csv", run_dir / "loss.png"):
                _remove(path)
        yield run_dir
    finally:
        (run_dir / LOCK_OWNER).unlink(missing_ok=True)
        (run_dir / LOCK).unlink(missing_ok=True)  # still held: a process that opened it now fails to lock it
        lock.release()
        if created and not any(run_dir.iterdir()):  # nothing was trained: leave no trace
            shutil.rmtree(run_dir, ignore_errors=True)


def _run_exists(run_dir: Path) -> ValueError:
    return ValueError(f"{run_dir} already holds a training run; continue it with --resume {run_dir}, "
                      "or pick another --out (or --overwrite to replace it)")


# -- reading ------------------------------------------------------------------------------------------------------
def is_qkv_checkpoint(directory: Path) -> bool:
    """A directory whose config.json says ``"format": "qkv"``, or a run directory (a ``latest`` file or a
    checkpoint ``step-*``)."""
    if (directory / LATEST).is_file() or _latest_or_newest(directory) is not None:
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
    if not (path / CONFIG).exists():
        target = _latest_or_newest(path)
        if target is not None:
            return target
        if (path / LATEST).is_file():
            raise FileNotFoundError(f"{path / LATEST} names {(path / LATEST).read_text().strip()}, which is "
                                    f"missing, and {path} holds no other checkpoint; start the run again")
        if (path / LOCK).is_file():
            raise FileNotFoundError(f"run directory {path} holds no checkpoint yet (the run stopped before its "
                                    "first save); start it again: the same command without --resume")
    return path


def _latest_or_newest(run_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names; when a kill came between a checkpoint's rename and ``latest``'s (or
    ``latest`` names one that is gone), the newest complete ``step-*`` (complete: it was renamed into place)."""
    try:
        target = run_dir / (run_dir / LATEST).read_text().strip()
        if (target / CONFIG).is_file():
            return target
    except (OSError, ValueError):
        pass
    steps = sorted(p for p in run_dir.glob("step-*") if (p / CONFIG).is_file()) if run_dir.is_dir() else []
    return steps[-1] if steps else None


ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # peft's names (LoRA runs)


def check_checkpoint_dir(directory: Path, *, need_state: bool = False) -> None:
    """Refuse a directory that lacks a file or holds pickled weights, naming what is wrong and what to do."""
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not (directory / WEIGHTS).is_file():
        raise ValueError(f"{directory} holds pickled weights ({', '.join(pickles)}) and no {WEIGHTS}; qkv loads "
                         "only safetensors, which cannot run code: convert the weights to safetensors first")
    weights = ADAPTER_WEIGHTS if (directory / ADAPTER_CONFIG).is_file() else WEIGHTS  # a LoRA run: adapters alone
    needed = [CONFIG, weights, TOKENIZER] + ([STATE_JSON, STATE_TENSORS] if need_state else [])
    missing = [name for name in needed if not (directory / name).is_file()]
    if missing:
        hint = ("; it is not a training checkpoint that can resume: pass a directory written by `qkv train`"
                if need_state and set(missing) <= {STATE_JSON, STATE_TENSORS} else
                "; pass a directory written by `qkv train` (or `qkv.checkpoint.save_checkpoint`)")
        raise FileNotFoundError(f"checkpoint {directory} is missing {', '.join(missing)}{hint}")


# -- integrity: each file against the sha256 its manifest recorded ------------------------------------------------
class CheckpointDamaged(ValueError):
    """A file of a checkpoint is not the one qkv wrote: its bytes differ from the sha256 in ``manifest.json``."""


@dataclass
class _ManifestEntry:
    sha256: str
    bytes: int


@dataclass
class _Manifest:
    files: dict
    format: str = "qkv-manifest"
    version: int = 1
    algorithm: str = "sha256"


def _damaged(path: Path, why: str) -> CheckpointDamaged:
    return CheckpointDamaged(f"{path} is damaged: use an earlier checkpoint ({why})")


def read_manifest(directory: str | Path) -> dict[str, dict] | None:
    """The files a directory's ``manifest.json`` lists → {relative path: {"sha256", "bytes"}}; None when it has
    none (written before manifests, or by another program): such a directory loads without the check."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"a JSON {type(data).__name__}, not an object")
        check_fields(_Manifest, data, unknown="keep", what="")
        for name, entry in data["files"].items():
            if not isinstance(entry, dict):
                raise ValueError(f"the entry of {name} is not an object")
            check_fields(_ManifestEntry, entry, unknown="keep", prefix=f"{name}: ", what="")
    except ValueError as err:
        raise _damaged(path, str(err)) from None
    return data["files"]


def verify_files(directory: str | Path, names: Iterable[str], manifest: dict[str, dict] | None) -> None:
    """Check each named file of ``directory`` against its entry in ``manifest`` (``read_manifest``): the same
    size and sha256, or ``CheckpointDamaged`` naming the file. Nothing is checked without a manifest, nor a name
    it does not list."""
    if manifest is None:
        return
    for name in names:
        entry, path = manifest.get(name), Path(directory) / name
        if entry is None:
            continue
        if not path.is_file():
            raise _damaged(path, f"{MANIFEST} lists it, and it is missing")
        if path.stat().st_size != entry["bytes"] or sha256_of(path) != entry["sha256"]:
            raise _damaged(path, f"its sha256 is not the one {MANIFEST} recorded when qkv wrote it; if you changed "
                                 f"it on purpose, delete its entry from {MANIFEST}")


def _read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object; anything else is one line naming the file."""
    try:
        data = json.loads(path.read_text())
    except ValueError as err:  # not JSON, or not UTF-8 text
        raise ValueError(f"{path} is not valid JSON ({err}); the checkpoint is damaged: use an earlier one") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object; the checkpoint is damaged: "
                         "use an earlier one")
    return data


# -- loading ------------------------------------------------------------------------------------------------------
def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu"):
    """→ (model in eval mode, tokenizer, checkpoint directory). The model is built from config.json.

    Each file is checked for what it must hold (JSON of the right fields and types, readable finite weights that
    fit the config, a tokenizer), then against the sha256 the checkpoint's manifest recorded (when it has one)."""
    directory = resolve_checkpoint(path)
    check_checkpoint_dir(directory)
    if (directory / ADAPTER_CONFIG).is_file():
        raise ValueError(f"{directory} holds LoRA adapters, not a whole model; load it with qkv.load (its base "
                         f"with the adapters), or merge them: qkv export {directory} --merge --format qkv --out DIR")
    manifest = read_manifest(directory)
    data = _read_json_object(directory / CONFIG)
    header = {name: data[name] for name in ("format", "format_version", "model_type") if name in data}
    check_fields(ConfigFileHeader, header, source=directory / CONFIG, what="")  # before comparing versions
    if data.get("format") != "qkv":
        raise ValueError(f"{directory / CONFIG} is not a qkv config (no \"format\": \"qkv\"); "
                         "load Hugging Face directories with qkv.load")
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{directory} was written by a newer qkv (format_version {data['format_version']} > "
                         f"{FORMAT_VERSION}); upgrade qkv to load it")
    config = ModelConfig.from_dict(data, source=directory / CONFIG)
    verify_files(directory, [CONFIG], manifest)
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
    verify_files(directory, [WEIGHTS], manifest)  # finite values of the right shapes can still be flipped bytes
    tokenizer = Tokenizer.load(directory / TOKENIZER)
    # the tokenizer's files and whatever else the checkpoint holds; the trainer state is checked where it is read
    verify_files(directory, [name for name in manifest or () if name not in (CONFIG, WEIGHTS, STATE_JSON,
                                                                               STATE_TENSORS)], manifest)
    return model.eval(), tokenizer, directory


@dataclass
class RunInfo:
    """What a training run records about itself (trainer_state.json's ``run``, written by its recipe): checked by
    name and type before use; keys a later recipe adds are kept."""

    recipe: str | None = None  # "language-model", "masked-lm", "translation"
    task: str | None = None
    data: str | None = None  # the absolute path of its data, or the bundled text's name
    data_sha256: str | None = None
    tokenizer: str | None = None
    model_type: str | None = None
    split_seed: int | None = None  # translation: how the pairs were split and batched
    n_test: int | None = None
    n_valid: int | None = None
    max_tokens: int | None = None


@dataclass
class _Evaluation:
    step: int
    elapsed_s: float
    val_loss: float


@dataclass
class _Schedule:
    name: str | None = None
    lr: float | None = None
    warmup_steps: int | None = None
    progress: float | None = None
    horizon: list | None = None
    lr_ratio: float | None = None


@dataclass
class _RandomState:
    torch: dict  # {"__tensor__": key}: the tensor is in trainer_state.safetensors
    numpy: list
    python: list
    cuda: list | None = None
    processes: list | None = None


@dataclass
class TrainerState:
    """trainer_state.json: the JSON side of what ``Trainer.state_dict`` saves (tensors stand as
    ``{"__tensor__": key}``), checked field by field, by these annotations, before a run resumes from it. Its
    ``train_config`` holds ``TrainConfig``'s fields, checked by ``TrainConfig.from_dict`` a layer above."""

    step: int
    elapsed: float
    tokens: int
    optimizer: dict
    rng: _RandomState
    train_config: dict
    run: RunInfo
    train_time: float | None = None
    data_position: int | None = None
    world_size: int = 1
    schedule: _Schedule | None = None
    history: list[_Evaluation] | None = None


@dataclass
class _RunOnly:
    run: RunInfo | None = None


def read_trainer_state_json(path: str | Path, *, whole: bool = True) -> dict:
    """A checkpoint's trainer_state.json, checked: JSON, an object, each field of the type ``TrainerState`` says
    (``whole=False``: only its ``run``), the bytes its manifest recorded. {} for a checkpoint without one."""
    directory = resolve_checkpoint(path)
    state_path = directory / STATE_JSON
    if not state_path.is_file():
        return {}
    meta = _read_json_object(state_path)
    if whole:
        check_fields(TrainerState, meta, source=state_path, unknown="keep", what="")
    else:
        check_fields(_RunOnly, {"run": meta.get("run")}, source=state_path, unknown="keep", what="")
    verify_files(directory, [STATE_JSON], read_manifest(directory))
    return meta


def read_run_info(path: str | Path) -> dict:
    """The ``run`` metadata a training checkpoint recorded (recipe, data path and sha256, ...); {} if none."""
    return read_trainer_state_json(path, whole=False).get("run") or {}


def load_trainer_state(path: str | Path) -> tuple[dict, Path]:
    """→ (the nested trainer state saved with the checkpoint, the checkpoint directory), every file checked."""
    directory = resolve_checkpoint(path)
    check_checkpoint_dir(directory, need_state=True)
    meta = read_trainer_state_json(directory)
    verify_files(directory, [STATE_TENSORS], read_manifest(directory))
    try:
        tensors = load_file(str(directory / STATE_TENSORS))
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{directory / STATE_TENSORS} is not a readable safetensors file ({err}); "
                         "the checkpoint is damaged: use an earlier one") from None
    try:
        return unflatten_state(meta, tensors), directory
    except KeyError as err:
        raise ValueError(f"{directory / STATE_JSON} names the tensor {err} that {STATE_TENSORS} lacks; the "
                         "checkpoint is damaged: use an earlier one") from None


def average_checkpoints(run_dir: str | Path, n: int) -> tuple[torch.nn.Module, Tokenizer, list[Path]]:
    """The paper's checkpoint averaging: θ = (1/n) Σ θ_i over the newest ``n`` checkpoints of a run directory."""
    run_dir = Path(run_dir)
    steps = sorted(p for p in run_dir.glob("step-*") if p.is_dir() and (p / WEIGHTS).is_file())[-n:]
    if len(steps) < n:
        raise ValueError(f"{run_dir} holds {len(steps)} checkpoint(s), fewer than --average {n}; train with "
                         f"--keep-checkpoints {n} or average fewer")
    model, tokenizer, _ = load_checkpoint(steps[-1])
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in model.state_dict().items()}
    for step in steps:
        verify_files(step, [WEIGHTS], read_manifest(step))
        for k, v in load_file(str(step / WEIGHTS)).items():
            total[k] += v.double()
    model.load_state_dict({k: (v / n).to(model.state_dict()[k].dtype) for k, v in total.items()})
    return model.eval(), tokenizer, steps
