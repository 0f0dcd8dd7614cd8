"""The ``qkv`` command. Each command lives in its own module here with ``add_parser`` and ``run``; the flags
several commands share are defined once in ``qkv.cli.options``.

Errors a user can fix (bad values, missing files, unknown tokens) print one line on stderr, naming the problem
and the fix, and exit with status 2. ``QKV_DEBUG=1`` shows the full traceback instead; so does a bug (a call that
does not fit its function).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from . import (
    bench_cmd,
    embed_cmd,
    eval_cmd,
    explain_cmd,
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
    "eval": eval_cmd,
    "translate": translate_cmd,
    "embed": embed_cmd,
    "show": show_cmd,
    "explain": explain_cmd,
    "serve": serve_cmd,
    "bench": bench_cmd,
    "study": study_cmd,
}


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line naming the fix (``qkv show attention: error: argument --dpi:
    invalid int value: 'abc'; see qkv show attention --help``) instead of the usage text followed by the error.
    Sub-commands' parsers are of this class too."""

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
        print(f"qkv {args.command}: error: {error_line(err)}", file=sys.stderr)
        return 2


# Python's own words for a call that does not fit its function: a bug in qkv, never the user's input
_WRONG_CALL = re.compile(r"\(\) (got an unexpected keyword argument|got multiple values for|missing \d+ required|"
                         r"takes \d+ positional argument|takes from \d+ to \d+ positional)")


def is_a_bug(err: BaseException) -> bool:
    """A TypeError of a call that does not fit its function signature is qkv's bug: show its traceback, so that
    it is reported, rather than one line that reads like a problem with the input."""
    return isinstance(err, TypeError) and bool(_WRONG_CALL.search(str(err)))


def error_line(err: BaseException) -> str:
    """One line for an expected error: its message; an operating-system error names the file and the reason
    (``/proc/x.png: No such file or directory``); running out of memory names the way out."""
    if isinstance(err, MemoryError):
        return "out of memory; try a shorter text, a smaller model or smaller sizes"
    if isinstance(err, OSError) and err.strerror and err.filename is not None:
        return f"{err.filename}: {err.strerror}"
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
