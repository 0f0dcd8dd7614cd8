"""Errors that name the options of a call in the words of the interface the caller used.

The library raises :class:`OptionError` (a ``ValueError``) with a message whose ``{name}`` fields are options:
``OptionError("{top_p} must lie in (0, 1]", top_p=2.0)``. Read as a string it speaks Python (``top_p=2.0 must lie
in (0, 1]``), the way a caller of ``generate(..., top_p=2.0)`` wrote it; the command line spells the same fields
as its flags (``--top-p 2.0 must lie in (0, 1]``, see ``qkv.cli``), so neither reads the other's words.

A field ``{name}`` shows the option with the value passed for it (``top_p=2.0``); ``{name:VALUE}`` with the
value written after the colon, a Python literal (``{sliding_window:True}``, ``{top_k:None}``: the value to choose,
on the command line ``without --no-sliding-window``, ``without --top-k``); ``{name:name}`` the name alone
(``max_new_tokens``); ``{name:...}`` the option with "a value of your choice" (``bos_token_id=...``).
"""

from __future__ import annotations

import ast
import string
from collections.abc import Callable
from typing import Any

__all__ = ["OptionError", "Spelling", "python_spelling"]

# (option name, its value, whether only the name is wanted) → the words for it
Spelling = Callable[[str, Any, bool], str]


def python_spelling(name: str, value: Any, name_only: bool) -> str:
    """``top_p=2.0``, ``bos_token_id=...``, or ``top_p`` alone: keyword arguments as a Python caller writes them."""
    if name_only:
        return name
    return f"{name}={'...' if value is ... else repr(value)}"


class _Field:
    def __init__(self, name: str, value: Any, spell: Spelling):
        self.name, self.value, self.spell = name, value, spell

    def __format__(self, spec: str) -> str:
        if spec == "name":
            return self.spell(self.name, None, True)
        return self.spell(self.name, ast.literal_eval(spec) if spec else self.value, False)


class _Fields(dict):
    def __init__(self, options: dict[str, Any], spell: Spelling):
        super().__init__()
        self.options, self.spell = options, spell

    def __missing__(self, name: str) -> _Field:
        return _Field(name, self.options.get(name, ...), self.spell)


class OptionError(ValueError):
    """A ``ValueError`` about options of a call: ``.options`` maps each option the message names to the value
    passed (``...`` where none was given); ``str(err)`` names them as Python does, :meth:`spelled` as another
    interface does."""

    def __init__(self, template: str, **options: Any):
        names = [field.split(":")[0] for _, field, _, _ in string.Formatter().parse(template) if field]
        self.template, self.options = template, {name: options.get(name, ...) for name in names}
        super().__init__(self.spelled(python_spelling))

    def spelled(self, spell: Spelling) -> str:
        """The message with each option written by ``spell(name, value, name_only)``."""
        return self.template.format_map(_Fields(self.options, spell))
