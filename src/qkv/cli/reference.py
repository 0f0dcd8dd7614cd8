"""The reference pages ``docs/reference/{cli,config,modules}.md``, rendered from the code.

Every ``qkv`` command's ``--help`` (as argparse prints it, 100 columns wide); every field of ``ModelConfig``,
``TrainConfig`` and ``GenerationConfig`` (type, default and the comment beside it in the source), plus the model
presets; every module of the package with the first sentence of its docstring. Nothing here is written by
hand, so the pages cannot drift from the code::

    python -m qkv.cli.reference            # rewrite docs/reference/*.md from the code
    python -m qkv.cli.reference --check    # exit 1, naming the stale page, if a page differs from the code

``tests/test_docs.py`` runs the check.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import inspect
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

__all__ = ["render_cli", "render_config", "PAGES", "write_pages", "stale_pages", "main"]

WIDTH = 100  # columns of the rendered --help text, whatever the terminal


@contextlib.contextmanager
def _columns(width: int) -> Iterator[None]:
    """argparse wraps help to $COLUMNS: fix it so the page is the same on every terminal."""
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)
    try:
        yield
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The sub-parsers of ``parser`` by name (``qkv show attention``, ...), in the order they were added."""
    for action in parser._actions:  # argparse keeps sub-parsers only here
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _help_pages(parser: argparse.ArgumentParser, name: str) -> Iterator[tuple[str, str]]:
    with _columns(WIDTH):
        yield name, parser.format_help()
    for sub_name, sub in _subcommands(parser).items():
        yield from _help_pages(sub, f"{name} {sub_name}")


def render_cli() -> str:
    """docs/reference/cli.md: ``qkv --help`` and each command's (and sub-command's) ``--help``."""
    from . import build_parser

    parser = build_parser()
    lines = ["# Command-line reference", "",
             "Generated from the code by `python -m qkv.cli.reference`; do not edit by hand "
             "(`tests/test_docs.py` checks that it is current). [The guides](../README.md#guides) show the "
             "commands at work.", ""]
    commands = [name for name, _ in _help_pages(parser, "qkv")][1:]
    lines += [f"- [`{name}`](#{name.replace(' ', '-')})" for name in commands] + [""]
    for name, text in _help_pages(parser, "qkv"):
        lines += [f"## {name}", "", "```text", text.rstrip(), "```", ""]
    return "\n".join(lines)


def _docstring_bullets(cls: type) -> dict[str, str]:
    """Meanings from the class docstring's bullets: ``- ``name`` / ``other``: text`` (continued lines joined)."""
    meanings: dict[str, str] = {}
    for bullet in re.split(r"\n\s*- ", "\n" + (inspect.getdoc(cls) or ""))[1:]:
        head, _, text = bullet.partition(": ")
        first, *others = re.split(r";\s*``(\w+)``:\s*", " ".join(text.split()))  # "...; ``other``: text"
        for name in re.findall(r"``(\w+)``", head):
            meanings[name] = first
        meanings.update(zip(others[::2], others[1::2], strict=True))
    return meanings


def _field_comments(cls: type) -> dict[str, str]:
    """The ``# comment`` after each field in the class's source (``name: type = default  # comment``), else
    the meaning its docstring's bullet gives."""
    comments = _docstring_bullets(cls)
    for line in inspect.getsource(cls).splitlines():
        match = re.match(r"\s+(\w+): [^=#]+(?:=[^#]*)?#\s*(.+)$", line)
        if match:
            comments[match.group(1)] = match.group(2).strip()
    return comments


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _fields_table(cls: type) -> list[str]:
    comments = _field_comments(cls)
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        rows.append(f"| `{f.name}` | `{_cell(kind)}` | `{default!r}` | {_cell(comments.get(f.name, ''))} |")
    return rows


def _first_paragraph(cls: type) -> str:
    return " ".join(inspect.getdoc(cls).split("\n\n")[0].split())


def render_config() -> str:
    """docs/reference/config.md: the fields of ModelConfig, TrainConfig, GenerationConfig, and the presets."""
    from ..config import PRESETS, ModelConfig
    from ..generation import GenerationConfig
    from ..training import TrainConfig

    lines = ["# Configuration reference", "",
             "Generated from the code by `python -m qkv.cli.reference`; do not edit by hand "
             "(`tests/test_docs.py` checks that it is current). Every field is also a `qkv train` flag "
             "(`d_model` → `--d-model`) and a key of its `--config` TOML file.", ""]
    for cls, home in ((ModelConfig, "qkv.ModelConfig"), (TrainConfig, "qkv.training.TrainConfig"),
                      (GenerationConfig, "qkv.generation.GenerationConfig")):
        lines += [f"## `{home}`", "", _first_paragraph(cls), "", *_fields_table(cls), ""]
    lines += ["## Presets", "", "`ModelConfig.preset(name, **overrides)`: the fields each preset sets "
              "(the rest keep the defaults above).", "", "| preset | fields |", "|---|---|"]
    for name, values in PRESETS.items():
        lines.append(f"| `{name}` | {', '.join(f'`{k}={v!r}`' for k, v in values.items())} |")
    return "\n".join(lines) + "\n"


def _summary(path: Path, limit: int = 160) -> str:
    """The first sentence of a module's docstring (read from its source: nothing is imported), at most ``limit``
    characters, cut at a word."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    paragraph = " ".join(doc.split("\n\n")[0].split())
    sentence = re.split(r"(?<=\.)\s", paragraph, maxsplit=1)[0]
    if len(sentence) > limit:
        sentence = sentence[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " …"
    return sentence.replace("|", "\\|")


def render_modules() -> str:
    """docs/reference/modules.md: every module of the package, one line each, from its docstring."""
    package = Path(__file__).resolve().parents[1]
    lines = ["# Module reference", "",
             "Generated from the code by `python -m qkv.cli.reference`; do not edit by hand "
             "(`tests/test_docs.py` checks that it is current). Each module's line is the first sentence of its "
             "docstring. How the modules depend on each other: [layers](../design/layers.md).", "",
             "| module | what it holds |", "|---|---|"]
    for path in sorted(package.rglob("*.py"), key=lambda p: (p.parent != package, str(p))):
        if path.name == "__main__.py" or "__pycache__" in path.parts:
            continue
        name = ".".join(("qkv", *path.relative_to(package).with_suffix("").parts)).removesuffix(".__init__")
        lines.append(f"| `{name}` | {_summary(path)} |")
    return "\n".join(lines) + "\n"


PAGES = {"cli.md": render_cli, "config.md": render_config, "modules.md": render_modules}


def _reference_dir() -> Path:
    """docs/reference of the repository this package sits in (``src/qkv/cli`` → the repository root)."""
    return Path(__file__).resolve().parents[3] / "docs" / "reference"


def write_pages(directory: Path | None = None) -> list[Path]:
    directory = directory or _reference_dir()
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, render in PAGES.items():
        (directory / name).write_text(render(), encoding="utf-8")
        written.append(directory / name)
    return written


def stale_pages(directory: Path | None = None) -> list[str]:
    """The pages under ``directory`` that differ from what the code renders now (missing ones included)."""
    directory = directory or _reference_dir()
    stale = []
    for name, render in PAGES.items():
        path = directory / name
        if not path.is_file() or path.read_text(encoding="utf-8") != render():
            stale.append(name)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qkv.cli.reference", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check the pages; exit 1 if one is stale")
    parser.add_argument("--out", type=Path, default=None, help="directory of the pages (default: docs/reference)")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_pages(args.out)
        for name in stale:
            print(f"docs/reference/{name} differs from the code; run: python -m qkv.cli.reference", file=sys.stderr)
        return 1 if stale else 0
    for path in write_pages(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
