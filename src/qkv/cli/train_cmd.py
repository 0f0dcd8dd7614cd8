"""``qkv train``: train a model (a preset, any ModelConfig field overridden) on a text; ``--resume`` continues."""

from __future__ import annotations

import argparse
import difflib
import sys
from dataclasses import Field, fields
from pathlib import Path
from typing import Any

from qkv import recipes
from qkv.config import ACTIVATIONS, NORM_POSITIONS, NORMS, PRESETS, ModelConfig
from qkv.losses import perplexity_text
from qkv.positions import POSITIONAL_KINDS
from qkv.tokenizers import BPE_VOCAB_SIZE
from qkv.training import PARALLELS, PRECISIONS, SCHEDULES, TrainConfig

from .options import add_threads, check_threads, use_threads

_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
# a run's own options; each recipe adds its own (qkv.recipes.Option), read from the table whenever it is needed
BASE_RUN_KEYS = ("preset", "data", "tokenizer", "model_type", "out")


def run_keys() -> tuple[str, ...]:
    """The options that are neither a ModelConfig nor a TrainConfig field: the run's own and every recipe's."""
    return (*BASE_RUN_KEYS, *dict.fromkeys(o.name for r in recipes.RECIPES.values() for o in r.options))
# The allowed values of the fields that take one of a few words, shown by --help (the dataclasses check them,
# with a message that says more than argparse's "invalid choice")
CHOICES = {"activation": ACTIVATIONS, "norm": NORMS, "norm_position": NORM_POSITIONS, "positional": POSITIONAL_KINDS,
           "schedule": SCHEDULES, "dtype": PRECISIONS, "parallel": PARALLELS}


def _add_field(group: argparse._ArgumentGroup, field: Field, section: str) -> None:
    """One option per dataclass field: ``d_model`` → ``--d-model``, bools as ``--x/--no-x``."""
    type_name = str(field.type).replace(" | None", "").strip()
    kind = _TYPES.get(type_name, str)
    flag = "--" + field.name.replace("_", "-")
    common = dict(dest=f"{section}.{field.name}", default=argparse.SUPPRESS)
    if kind is bool:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, help=f"{section} field {field.name}",
                           **common)
    else:
        choices = CHOICES.get(field.name)
        metavar = "{" + ",".join(choices) + "}" if choices else type_name.upper()
        group.add_argument(flag, type=kind, metavar=metavar, help=f"{section} field {field.name}", **common)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a model on a text (default: the bundled tiny Shakespeare)",
        description="Train a preset on a text, overriding any model field (--d-model 128) or training option "
                    "(--max-steps, --time-budget, --lr, ...). Options can also come from --config FILE.toml "
                    "(keys named like the fields; flags win). --resume DIR continues a saved run exactly.")
    p.add_argument("preset", nargs="?", default=argparse.SUPPRESS,
                   help=f"model preset (default tiny-decoder): {', '.join(PRESETS)}")
    p.add_argument("--data", default=argparse.SUPPRESS,
                   help="a text file or a folder of text files (default: the bundled tiny Shakespeare)")
    p.add_argument("--tokenizer", choices=["char", "bpe"], default=argparse.SUPPRESS,
                   help=f"char (default) or byte-level bpe (its size: --vocab-size, default {BPE_VOCAB_SIZE})")
    p.add_argument("--model-type", choices=["decoder", "encoder", "seq2seq"], default=argparse.SUPPRESS,
                   help="decoder: next-token LM; encoder: masked LM; seq2seq: translation on a parallel --data "
                        "file (default: what the preset's layers imply)")
    p.add_argument("--out", default=argparse.SUPPRESS, help="run directory (default runs/<preset>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR (a run or checkpoint directory); "
                   "with a larger --max-steps or --time-budget the extra steps keep the finished schedule's last "
                   "learning rate")
    p.add_argument("--config", metavar="FILE", help="a TOML file of options (flat, or [model] / [train] tables)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    add_threads(p, help="CPU threads for torch (default: torch's choice; also a TOML key)")
    added: set[str] = set()
    for recipe in recipes.RECIPES.values():  # each recipe's own options, in a group of its own
        options = [o for o in recipe.options if o.name not in added]
        if not options:
            continue
        group = p.add_argument_group(recipe.options_title or f"{recipe.name} runs")
        for option in options:
            group.add_argument("--" + option.name.replace("_", "-"), dest=option.name, type=option.type,
                               default=argparse.SUPPRESS, help=option.help)
            added.add(option.name)
    model = p.add_argument_group("model (any ModelConfig field; default: the preset's value)")
    for field in fields(ModelConfig):
        _add_field(model, field, "model")
    trainer = p.add_argument_group("training (any TrainConfig field)")
    for field in fields(TrainConfig):
        _add_field(trainer, field, "train")
    p.set_defaults(run=run)


def read_toml(path: str | Path) -> dict[str, dict[str, Any]]:
    """A TOML options file → {"run": ..., "model": ..., "train": ...}; an unknown key names the closest one."""
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist; pass a TOML file of training options")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path} is not valid TOML: {err}") from None
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("model", "train") and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    out: dict[str, dict[str, Any]] = {"run": {}, "model": {}, "train": {}}
    model_keys, train_keys, own_keys = ModelConfig.field_names(), TrainConfig.field_names(), run_keys()
    for key, value in flat.items():
        key = key.replace("-", "_")
        if key == "threads":  # not a field of a run: how this process runs it
            out["run"]["threads"] = check_threads(value, f"{path}: threads")
            continue
        section = ("run" if key in own_keys else "model" if key in model_keys else
                   "train" if key in train_keys else None)
        if section is None:
            known = [*own_keys, *model_keys, *train_keys]
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "see `qkv train --help` for the names"
            raise ValueError(f"{path}: unknown option {key!r}; {hint}")
        out[section][key] = value
    return out


def collect(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Options from --config, then the command line on top: {"run", "model", "train"}."""
    options = read_toml(args.config) if args.config else {"run": {}, "model": {}, "train": {}}
    own_keys = run_keys()
    for key, value in vars(args).items():
        if "." in key:
            section, name = key.split(".", 1)
            options[section][name] = value
        elif key in own_keys:
            options["run"][key] = value
    return options


def run(args: argparse.Namespace) -> int:
    from qkv.checkpoint import CheckpointNotSaved
    from qkv.recipes import resume
    from qkv.training import TrainingDiverged, TrainingInterrupted, say_once

    options = collect(args)
    run_opts, model_opts, train_opts = options["run"], options["model"], options["train"]
    threads = run_opts.pop("threads", None)
    use_threads(args.threads if args.threads is not None else threads)  # the flag wins over the file
    try:
        if args.resume:
            fixed = [f"--{k.replace('_', '-')}" for k in (*run_opts, *model_opts) if k not in ("data", "out")]
            if args.config or args.overwrite or fixed:
                what = ", ".join(fixed + ["--config"] * bool(args.config) + ["--overwrite"] * bool(args.overwrite))
                raise ValueError(f"--resume continues a run with its saved model and tokenizer; {what} cannot "
                                 "change it: drop them, or start a new run without --resume")
            result = resume(args.resume, train_opts, data=run_opts.get("data"), out_dir=run_opts.get("out"))
        else:  # the recipe the options choose (qkv.recipes.RECIPES) builds and trains the run
            result = recipes.start(recipes.RunOptions(run_opts, model_opts, train_opts, overwrite=args.overwrite))
    except TrainingDiverged as err:
        print(f"qkv train: {err}", file=sys.stderr)
        return 3
    except TrainingInterrupted as err:
        print(f"qkv train: interrupted: {err}", file=sys.stderr)
        return 130
    except CheckpointNotSaved as err:  # a full disk: the message says which checkpoint the run kept
        print(f"qkv train: error: {err}", file=sys.stderr)
        return 1
    out = result.checkpoint.parent
    say_once(f"done: step {result.step}, validation loss {result.val_loss:.4f} "
             f"(perplexity {perplexity_text(result.val_loss)}) after {result.elapsed:.1f} s, "
             f"{result.tokens_per_s:,.0f} tokens/s{_peak_memory()}")
    curve = (f"loss curve {result.loss_curve}" if result.loss_curve is not None else
             "no loss curve (it needs matplotlib: pip install 'qkv[viz]')")
    say_once(f"checkpoint {result.checkpoint}; metrics {out / 'metrics.csv'}; {curve}")
    return 0


def _peak_memory() -> str:
    """", peak memory 1.23 GB": this process's peak resident memory (what fine-tuning a bigger model needs), or ""
    where the platform does not say (no ``resource`` module: Windows)."""
    try:
        import resource
    except ImportError:
        return ""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return f", peak memory {peak * (1 if sys.platform == 'darwin' else 1024) / 1e9:.2f} GB"
