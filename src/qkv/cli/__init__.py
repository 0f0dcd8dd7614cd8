"""The ``qkv`` command. Each command lives in its own module here with ``add_parser`` and ``run``; the flags
several commands share are defined once in ``qkv.cli.options``.

Errors a user can fix (bad values, missing files, unknown tokens) print one line on stderr, naming the problem
and the fix, and exit with status 2. ``QKV_DEBUG=1`` shows the full traceback instead; so does a bug (a call that
does not fit its function). An error about options of the library (``qkv.errors.OptionError``) names them as the
command's flags: ``top_p=2.0`` is said ``--top-p 2.0``, ``sliding_window=False`` ``--no-sliding-window``.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from typing import Any

from qkv.errors import OptionError

from . import (
    bench_cmd,
    chat_cmd,
    embed_cmd,
    eval_cmd,
    explain_cmd,
    export_cmd,
    generate_cmd,
    info_cmd,
    serve_cmd,
    show_cmd,
    study_cmd,
    train_cmd,
    translate_cmd,
)

__all__ = ["main", "COMMANDS", "build_parser"]

# command name → its module (``add_parser(sub)`` adds its flags, ``run(args)`` calls the library), in the order
# ``qkv --help`` lists them. A command is here or it does not exist: a module that fails to import is an error.
COMMANDS = {
    "info": info_cmd,
    "train": train_cmd,
    "generate": generate_cmd,
    "chat": chat_cmd,
    "eval": eval_cmd,
    "translate": translate_cmd,
    "embed": embed_cmd,
    "show": show_cmd,
    "explain": explain_cmd,
    "serve": serve_cmd,
    "bench": bench_cmd,
    "study": study_cmd,
    "export": export_cmd,
}


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line naming the fix (``qkv show attention: error: argument --dpi:
    invalid int value: 'abc'; see qkv show attention --help``) instead of the usage text followed by the error.
    Sub-commands' parsers are of this class too; each records itself as ``args.cli_parser``, so that an error can
    be worded in the flags of the command that ran (the innermost sub-command's parser wins)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.set_defaults(cli_parser=self)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="qkv", description="The Transformer, every formula as code.")
    parser.add_argument("--version", action="version", version=f"qkv {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        module.add_parser(sub)
    return parser


def _version() -> str:
    from qkv import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("qkv: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, ImportError, MemoryError) as err:
        if os.environ.get("QKV_DEBUG") or is_a_bug(err):
            raise
        print(f"qkv {args.command}: error: {error_line(err, getattr(args, 'cli_parser', None))}", file=sys.stderr)
        return 2


# Python's own words for a call that does not fit its function: a bug in qkv, never the user's input
_WRONG_CALL = re.compile(r"\(\) (got an unexpected keyword argument|got multiple values for|missing \d+ required|"
                         r"takes \d+ positional argument|takes from \d+ to \d+ positional)")


def is_a_bug(err: BaseException) -> bool:
    """A TypeError of a call that does not fit its function signature is qkv's bug: show its traceback, so that
    it is reported, rather than one line that reads like a problem with the input."""
    return isinstance(err, TypeError) and bool(_WRONG_CALL.search(str(err)))


# library option → the dests of flags that set it under another name (True: the flag says the opposite)
OPTION_FLAGS = {"stop_strings": [("stop", False)], "stop_token_ids": [("stop_id", False)],
                "use_cache": [("no_cache", True)], "num_beams": [("beam", False)], "length_penalty": [("alpha", False)]}


def flag_spelling(parser: argparse.ArgumentParser):
    """How ``parser``'s command says a library option (a ``qkv.errors.Spelling``): its flag, and the value as it
    is typed (``--top-p 2.0``, ``--stop ''``, ``--no-sliding-window``, ``without --no-sliding-window``). The flag is
    the one whose dest is the option's name (``top_p``; ``train.warmup_steps`` for ``warmup_steps``), or
    ``no_NAME`` for a switch that turns it off, or as ``OPTION_FLAGS`` says; an option no flag sets keeps its
    Python name, and a field of the model's config says where it lives (``bos_token_id in config.json``)."""
    flags = {a.dest: a for a in parser._actions if a.option_strings}

    def find(name: str) -> tuple[argparse.Action | None, bool]:
        for dest, negated in [(name, False), *OPTION_FLAGS.get(name, []), (f"no_{name}", True)]:
            for key, action in flags.items():
                if key == dest or key.endswith("." + dest):
                    return action, negated
        return None, False

    def spell(name: str, value: Any, name_only: bool) -> str:
        action, negated = find(name)
        if action is None:
            from qkv.config import ModelConfig

            if name in ModelConfig.__dataclass_fields__:
                return f"{name} in the checkpoint's config.json" if name_only or value is ... else \
                    f"{name}={value!r} in the checkpoint's config.json"
            return name if name_only else f"{name}={value!r}"
        flag = max(action.option_strings, key=len)
        if name_only:
            return flag
        if action.nargs == 0:  # a switch: on when the value is what it sets
            return flag if bool(value) != negated else f"without {flag}"
        if value is None:
            return f"without {flag}"
        values = value if isinstance(value, (list, tuple)) else [value]
        return " ".join(f"{flag} {shlex.quote(str(v))}" for v in values) if values else f"without {flag}"

    return spell


def error_line(err: BaseException, parser: argparse.ArgumentParser | None = None) -> str:
    """One line for an expected error: its message; an operating-system error names the file and the reason
    (``/proc/x.png: No such file or directory``); running out of memory names the way out; an error about library
    options names them as ``parser``'s flags (``flag_spelling``)."""
    if isinstance(err, OptionError) and parser is not None:
        return err.spelled(flag_spelling(parser)).strip().splitlines()[0]
    if isinstance(err, MemoryError):
        return "out of memory; try a shorter text, a smaller model or smaller sizes"
    if isinstance(err, OSError) and err.strerror and err.filename is not None:
        return f"{err.filename}: {err.strerror}"
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
