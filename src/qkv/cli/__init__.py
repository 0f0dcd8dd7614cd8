"""The ``qkv`` command. Each command lives in its own module here with ``add_parser`` and ``run``.

Errors a user can fix (bad values, missing files, unknown tokens) print one line on stderr, naming the problem
and the fix, and exit with status 2. ``QKV_DEBUG=1`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

__all__ = ["main", "COMMANDS"]

# command name → module under qkv.cli; a module that is not there yet is skipped.
COMMANDS = ["info", "train", "generate", "eval", "translate", "embed", "show", "explain", "serve", "bench", "study"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qkv", description="The Transformer, every formula as code.")
    parser.add_argument("--version", action="version", version=f"qkv {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"qkv.cli.{name}_cmd")
        except ModuleNotFoundError as err:
            if err.name == f"qkv.cli.{name}_cmd":
                continue
            raise
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
        if os.environ.get("QKV_DEBUG"):
            raise
        print(f"qkv {args.command}: error: {error_line(err)}", file=sys.stderr)
        return 2


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
