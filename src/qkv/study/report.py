"""What every study writes: a markdown table, a CSV and PNG plots under ``runs/study/<name>/``, and a progress bar.

A study's results are a :class:`StudyResult`: named tables (lists of rows, each row a dict from column to value),
the settings they were measured with, and the figures drawn from them. :func:`write_result` turns it into
``results.md`` (settings, tables, pictures), ``results.csv`` (every table, one row per line, a ``table`` column
naming which) and keeps the PNG paths.
"""

from __future__ import annotations

import csv
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..extras import require

# the line under the title of a quick run's results.md, also printed by ``qkv study --quick``
QUICK_NOTE = ("**A quick run** (`--quick`: tiny models trained for seconds): it shows that the study runs, not what "
              "it measures; run it without --quick for the results.")

__all__ = ["QUICK_NOTE", "StudyResult", "Progress", "markdown_table", "format_value", "write_result", "finish",
           "pyplot", "save_figure"]


@dataclass
class StudyResult:
    """One study's measurements: ``tables`` maps a table name to its rows (dicts with the same keys)."""

    name: str
    title: str
    settings: dict[str, Any]
    tables: dict[str, list[dict[str, Any]]]
    captions: dict[str, str] = field(default_factory=dict)  # table name → one line above it in results.md
    notes: list[str] = field(default_factory=list)  # lines after the tables (what the numbers say)
    figures: list[Path] = field(default_factory=list)
    out_dir: Path | None = None
    seconds: float = 0.0  # wall time of the whole study
    cpu_seconds: float = 0.0  # CPU time of this process over the study (wall time inflates on a busy machine)
    quick: bool = False  # a quick run (tiny sizes, seconds): results.md says so at the top

    def table(self, name: str) -> list[dict[str, Any]]:
        return self.tables[name]


def format_value(value: Any) -> str:
    """A cell: floats with 4 significant digits (3 decimals when >= 1), NaN as "NaN", None as "n/a"."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value == 0.0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.3f}"
        if abs(value) < 1e-3:
            return f"{value:.1e}"
        return f"{value:.4f}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows of dicts → a GitHub markdown table; text columns align left, numbers right."""
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())
    numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows) for c in columns]
    cells = [[_escape(format_value(r.get(c))) for c in columns] for r in rows]
    header = [_escape(c) for c in columns]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(header)]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.rjust(w) if num else v.ljust(w)
                                 for v, w, num in zip(values, widths, numeric, strict=True)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2))
                          for w, num in zip(widths, numeric, strict=True)) + "|"
    return "\n".join([line(header), rule, *(line(row) for row in cells)])


def _escape(text: str) -> str:
    """A "|" inside a cell (``max |difference|``) would end the cell: markdown wants it as "\\|"."""
    return text.replace("|", "\\|")


def finish(result: StudyResult, out_dir: Path, draw: Callable[[Path], list[Path]],
           started: tuple[float, float]) -> StudyResult:
    """End a study: ``draw(out_dir)`` writes its figures, the wall and CPU seconds since ``started``
    (``time.perf_counter()``, ``time.process_time()``) are stamped, and results.md/.csv are written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result.figures = draw(out_dir)
    result.seconds = time.perf_counter() - started[0]
    result.cpu_seconds = time.process_time() - started[1]
    write_result(result, out_dir)
    return result


def write_result(result: StudyResult, out_dir: str | Path) -> Path:
    """Write ``results.md`` and ``results.csv`` into ``out_dir`` (the figures are already there); → results.md."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result.out_dir = out_dir
    settings = "; ".join(f"{k} {format_value(v)}" for k, v in result.settings.items())
    load = f", load average {os.getloadavg()[0]:.1f} at the end" if hasattr(os, "getloadavg") else ""
    parts = [f"# {result.title}", "", *([QUICK_NOTE, ""] if result.quick else []), f"Settings: {settings}.", "",
             f"Wall time {result.seconds:.0f} s, CPU time {result.cpu_seconds:.0f} s{load}.", ""]
    for name, rows in result.tables.items():
        parts += [f"## {name}", ""]
        if name in result.captions:
            parts += [result.captions[name], ""]
        parts += [markdown_table(rows), ""]
    if result.notes:
        parts += ["## What it shows", "", *result.notes, ""]
    for figure in result.figures:
        parts += [f"![{figure.stem}]({figure.name})", ""]
    path = out_dir / "results.md"
    path.write_text("\n".join(parts))

    fields = ["table"] + list(dict.fromkeys(k for rows in result.tables.values() for r in rows for k in r))
    with (out_dir / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        for name, rows in result.tables.items():
            for r in rows:
                writer.writerow({"table": name, **{k: ("n/a" if v is None else v) for k, v in r.items()}})
    return path


class Progress:
    """A progress bar over ``total`` units of work: tqdm when installed (the ``progress`` extra), else a plain
    line on stderr at every tenth of the way. ``enabled=False`` prints nothing."""

    def __init__(self, total: int, desc: str, *, enabled: bool = True):
        self.total, self.desc, self.enabled = max(1, total), desc, enabled
        self.done = 0
        self._bar = None
        self._last_tenth = -1
        self._start = time.perf_counter()
        if enabled:
            try:
                tqdm = require("tqdm.auto", "the progress bar").tqdm
                self._bar = tqdm(total=self.total, desc=desc, unit="step", dynamic_ncols=True, leave=False,
                                 file=sys.stderr)
            except ImportError:
                pass

    def update(self, n: int = 1, note: str | None = None) -> None:
        """``n`` more units done; ``note`` says what is running now (shown beside the bar)."""
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            if note is not None:
                self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(n)
            return
        tenth = 10 * self.done // self.total
        if tenth > self._last_tenth:
            self._last_tenth = tenth
            where = f", {note}" if note else ""
            print(f"{self.desc}: {100 * self.done // self.total}% ({self.done}/{self.total}{where}, "
                  f"{time.perf_counter() - self._start:.0f} s)", file=sys.stderr, flush=True)

    def write(self, message: str) -> None:
        """A line that does not break the bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pyplot():
    """matplotlib.pyplot on the Agg backend; ImportError naming the ``viz`` extra when it is missing."""
    from ..viz.heatmap import _pyplot

    return _pyplot()


def save_figure(fig, path: str | Path) -> Path:
    """Write a figure as PNG (qkv.viz's one way of saving), 120 dpi: readable at README width (~900 px)."""
    from ..viz import save_figure as save

    return save(fig, path)
