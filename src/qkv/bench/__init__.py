"""Benchmarks whose logic ships with the package (``qkv bench``); ``benchmarks/`` holds thin scripts at most."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

__all__ = ["CONTENDERS", "require_contenders"]

# suite → the libraries it measures qkv against (import names), all in the ``bench`` extra
CONTENDERS = {"training": ("transformers", "x_transformers"), "generate": ("transformers",)}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken install, or a module set to None in sys.modules
        return False


def require_contenders(suites: Iterable[str]) -> None:
    """Refuse, before measuring anything, suites whose contenders are not installed: ``ImportError`` naming them
    and the extra that installs them (``pip install 'qkv[bench]'``)."""
    suites = list(suites)
    missing = sorted({m for s in suites for m in CONTENDERS.get(s, ()) if not _installed(m)})
    if missing:
        names = " and ".join(m.replace("_", "-") for m in missing)
        needing = " and ".join(s for s in suites if set(CONTENDERS.get(s, ())) & set(missing))
        raise ImportError(f"the {needing} benchmark compares qkv with {names}, which this Python lacks: "
                          "pip install 'qkv[bench]' (qkv bench attention needs neither)")
