"""The README and docs/ say what the code does, and keep saying it when the code moves.

- every relative link in README.md and docs/ resolves to a file (and a heading, when it names one);
- every code quote `src/qkv/FILE.py:LINE SYMBOL` (or `tests/FILE.py:LINE SYMBOL`) names a line that contains
  SYMBOL, and every excerpt block that starts with `# PATH:A-B` (a repository file) equals those lines of it;
- the commands and Python snippets marked `<!-- test: run -->` run (console blocks also print what they show);
- the reference pages equal what `python -m qkv.cli.reference` renders from the code now;
- the README stays a front page: at most 200 lines.

After code moves, ``python tests/test_docs.py --refresh`` points each quote at the line where its symbol (or its
excerpt's text) now is, and says which it cannot find; read the result before committing it.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
QUOTE = re.compile(r"`((?:src/qkv|tests)/[\w/]+\.py):(\d+) ([\w.]+)`")
EXCERPT = re.compile(r"```(\w+)\n# ([\w./-]+\.\w+):(\d+)-(\d+)\n(.*?)```", re.S)
MARKED = re.compile(r"<!-- test: run -->\n```(\w+)\n(.*?)```", re.S)


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {_anchor(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_the_readme_is_a_front_page_of_at_most_200_lines():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 200, f"README.md has {lines} lines; move the detail into a page under docs/ and link it"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_relative_link_resolves(page):
    broken = []
    for match in LINK.finditer(page.read_text(encoding="utf-8")):
        target = match.group(1) or match.group(2)
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target} (no file {resolved.relative_to(ROOT) if ROOT in resolved.parents else path})")
        elif fragment and resolved.suffix == ".md" and fragment not in _anchors(resolved):
            broken.append(f"{target} (no heading #{fragment} in {resolved.name})")
    assert not broken, f"{_rel(page)}: broken links: {broken}"


def test_every_docs_page_is_reachable_from_the_readme():
    seen, todo = set(), [ROOT / "README.md"]
    while todo:
        page = todo.pop()
        if page in seen or page.suffix != ".md" or not page.is_file():
            continue
        seen.add(page)
        for match in LINK.finditer(page.read_text(encoding="utf-8")):
            target = (match.group(1) or match.group(2)).partition("#")[0]
            if target and not re.match(r"[a-z]+:", target):
                resolved = (page.parent / target).resolve()
                todo += [resolved / "README.md"] if resolved.is_dir() else [resolved]
    unreachable = [_rel(p) for p in PAGES if p not in seen]
    assert not unreachable, f"pages no link leads to from README.md: {unreachable}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_code_quote_points_at_its_symbol(page):
    wrong = _wrong_quotes(page.read_text(encoding="utf-8"))
    assert not wrong, (f"{_rel(page)}: quotes that no longer match the code: {wrong}; "
                       "run `python tests/test_docs.py --refresh` and check the result")


def _source(path: str, rev: str | None = None) -> list[str]:
    """The lines of a repository file, as in the working tree or (``rev``) as committed; [] if absent."""
    if rev is None:
        file = ROOT / path
        return file.read_text(encoding="utf-8").splitlines() if file.is_file() else []
    shown = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True)
    return shown.stdout.splitlines() if shown.returncode == 0 else []


def _wrong_quotes(text: str, rev: str | None = None) -> list[str]:
    wrong = []
    for path, line, symbol in QUOTE.findall(text):
        lines = _source(path, rev)
        if not 1 <= int(line) <= len(lines) or symbol.split(".")[-1] not in lines[int(line) - 1]:
            wrong.append(f"{path}:{line} {symbol}")
    for _, path, first, last, body in EXCERPT.findall(text):
        lines = _source(path, rev)[int(first) - 1: int(last)]
        if textwrap.dedent("\n".join(lines)).strip() != textwrap.dedent(body).strip():
            wrong.append(f"excerpt {path}:{first}-{last}")
    return wrong


def _marked_blocks() -> list[tuple[str, int, str, str]]:
    blocks = []
    for page in PAGES:
        for i, match in enumerate(MARKED.finditer(page.read_text(encoding="utf-8"))):
            blocks.append((_rel(page), i, match.group(1), match.group(2)))
    return blocks


def _environment(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, QKV_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(ROOT / "src"))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("page,index,language,body", _marked_blocks(),
                         ids=[f"{page}#{index}" for page, index, _, _ in _marked_blocks()])
def test_the_marked_commands_and_snippets_run(page, index, language, body, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path / "cache"))
    if language == "python":
        exec(compile(body, f"{page} block {index}", "exec"), {"__name__": "__docs__"})
        return
    assert language == "console", f"{page}: a marked block must be python or console, not {language}"
    for command, shown in re.findall(r"^\$ (.+)\n((?:(?!\$ ).*\n)*)", body, flags=re.M):
        out = _run(command, tmp_path, page)
        if shown.strip() and not shown.lstrip().startswith("..."):
            assert out.strip() == shown.strip(), f"{page}: `{command}` now prints:\n{out}"


def _run(command: str, tmp_path: Path, page: str) -> str:
    """A `qkv ...` command runs in this process (no second interpreter to start); anything else in a shell."""
    words = shlex.split(command)
    if words[0] == "qkv" and not set(command) & set("|;&$<>"):
        from qkv.cli import main

        with contextlib.redirect_stdout(io.StringIO()) as out:
            status = main(words[1:])
        assert not status, f"{page}: `{command}` exited with status {status}"
        return out.getvalue()
    done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=60, env=_environment(tmp_path))
    assert done.returncode == 0, f"{page}: `{command}` failed: {done.stderr.strip()[-500:]}"
    return done.stdout


def test_the_reference_pages_are_rendered_from_the_code_as_it_is():
    from qkv.cli.reference import stale_pages

    stale = stale_pages(ROOT / "docs" / "reference")
    assert not stale, f"docs/reference/{stale} differ from the code; run `python -m qkv.cli.reference`"


# -- keeping quotes current ----------------------------------------------------------------------------------------
def _definition_line(lines: list[str], symbol: str, *, mention: bool = False) -> int | None:
    """1-based line where ``symbol`` (``Class.method`` or ``name``) is defined; with ``mention``, else the line
    that first names it."""
    *parents, name = symbol.split(".")
    start = 0
    for parent in parents:
        found = next((i for i, line in enumerate(lines) if re.match(rf"\s*class {parent}\b", line)), None)
        if found is None:
            return None
        start = found
    definition = re.compile(rf"\s*(?:async def|def|class) {name}\b|\s*{name}\s*(?::[^=]+)?=")
    found = next((i for i in range(start, len(lines)) if definition.match(lines[i])), None)
    if found is None and mention:
        found = next((i for i in range(start, len(lines)) if re.search(rf"\b{name}\b", lines[i])), None)
    return None if found is None else found + 1


def _find_excerpt(lines: list[str], body: str) -> tuple[int, int] | None:
    wanted = [line.strip() for line in body.strip().splitlines()]
    stripped = [line.strip() for line in lines]
    for i in range(len(stripped) - len(wanted) + 1):
        if stripped[i: i + len(wanted)] == wanted:
            return i + 1, i + len(wanted)
    return None


def _python_files(rev: str | None) -> list[str]:
    if rev is None:
        return sorted(str(p.relative_to(ROOT)) for top in ("src/qkv", "tests") for p in (ROOT / top).rglob("*.py"))
    listed = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, "src/qkv", "tests"], cwd=ROOT,
                            capture_output=True, text=True, check=True)
    return [p for p in listed.stdout.splitlines() if p.endswith(".py")]


def refresh(rev: str | None = None) -> int:
    """Re-point every quote at the line where its symbol (or excerpt) now is, in the file it names or, when that
    file only re-exports it, in the file that defines it; report the ones not found (exit status 1)."""
    lost = []
    files = _python_files(rev)

    def locate(path: str, find) -> tuple[str, object] | None:
        for candidate in [path] + [f for f in files if f != path]:
            found = find(_source(candidate, rev))
            if found is not None:
                return candidate, found
        return None

    for page in PAGES:
        text = page.read_text(encoding="utf-8")

        def quote(match: re.Match, page: Path = page) -> str:
            path, _, symbol = match.groups()
            where = (locate(path, lambda lines: _definition_line(lines, symbol))
                     or locate(path, lambda lines: _definition_line(lines, symbol, mention=True)))
            if where is None:
                lost.append(f"{_rel(page)}: {path} {symbol}")
                return match.group(0)
            return f"`{where[0]}:{where[1]} {symbol}`"

        def excerpt(match: re.Match, page: Path = page) -> str:
            language, path, first, last, body = match.groups()
            find = (lambda lines: _find_excerpt(lines, body))  # noqa: E731
            where = locate(path, find) if path.endswith(".py") else (path, find(_source(path, rev)))
            if where is None or where[1] is None:
                lost.append(f"{_rel(page)}: excerpt {path}:{first}-{last}")
                return match.group(0)
            return f"```{language}\n# {where[0]}:{where[1][0]}-{where[1][1]}\n{body}```"

        new = EXCERPT.sub(excerpt, QUOTE.sub(quote, text))
        if new != text:
            page.write_text(new, encoding="utf-8")
            print(f"updated {_rel(page)}")
    for item in lost:
        print(f"not found, fix by hand: {item}", file=sys.stderr)
    return 1 if lost else 0


def check(rev: str | None = None) -> int:
    """Exit status 1, naming them, if quotes do not match the code (the working tree, or ``rev`` as committed)."""
    wrong = [f"{_rel(page)}: {q}" for page in PAGES for q in _wrong_quotes(page.read_text(encoding="utf-8"), rev)]
    for item in wrong:
        print(f"does not match: {item}", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Keep the docs' code quotes pointing at the code.")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--refresh", action="store_true", help="re-point every quote at its symbol's line")
    action.add_argument("--check", action="store_true", help="only report the quotes that do not match")
    parser.add_argument("--rev", help="read the code as committed at this git revision (default: the working tree)")
    args = parser.parse_args()
    sys.exit(refresh(args.rev) if args.refresh else check(args.rev))
