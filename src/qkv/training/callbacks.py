"""What a training run does around its steps, as callbacks: stop cleanly on a signal, show progress, log metrics,
draw the loss curve.

The trainer calls, in list order, ``start`` before its first step and ``log`` with each metrics row; ``finish``
in reverse order when the loop ends for any reason (a finished run, a signal, divergence, an error: files close,
signal handlers come back); ``end`` only after a run that completed. A message the trainer prints goes to the
first callback whose ``write`` takes it (a progress bar writes above itself), else to the trainer's print.
"""

from __future__ import annotations

import csv
import io
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from ..checkpoint import CheckpointNotSaved, fault_point, resolve_checkpoint, write_atomic
from ..extras import require

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["Callback", "StopOnSignal", "ProgressBar", "MetricsLog", "LossCurve", "default_callbacks", "CSV_FIELDS",
           "plot_loss_curve"]

# train_loss is the training objective (label-smoothed by the row's label_smoothing when it is not 0); val_loss is
# plain cross-entropy per predicted token, the figure `qkv eval` gives, and val_ppl = exp(val_loss).
CSV_FIELDS = ["step", "elapsed_s", "tokens", "lr", "train_loss", "val_loss", "val_ppl", "tokens_per_s",
              "label_smoothing"]
ADDED_FIELDS = 1  # columns appended since metrics.csv began: a run written before lacks them (left empty)


class Callback:
    """Hooks around the training loop; each does nothing unless a subclass overrides it."""

    def start(self, trainer: Trainer) -> None:
        """Before the first step of ``Trainer.fit`` (``trainer.step`` is where the run starts, 0 or resumed)."""

    def log(self, trainer: Trainer, row: dict) -> None:
        """A metrics row (keys from ``CSV_FIELDS``): every ``log_every`` steps and at each evaluation."""

    def write(self, message: str) -> bool:
        """Show ``message`` instead of the trainer's print; True when it did."""
        return False

    def finish(self, trainer: Trainer) -> None:
        """The loop has ended, however it ended: release what ``start`` took."""

    def end(self, trainer: Trainer) -> None:
        """The run completed and saved its last checkpoint."""


class StopOnSignal(Callback):
    """SIGINT/SIGTERM set ``trainer.stop_signal``: the loop finishes its step, saves, and stops. A second Ctrl-C
    stops at once. (Signal handlers can only be installed from the main thread; elsewhere this does nothing.)"""

    def __init__(self) -> None:
        self.previous: dict = {}

    def start(self, trainer: Trainer) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            if trainer.stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            trainer.stop_signal = signum

        self.previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def finish(self, trainer: Trainer) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)
        self.previous = {}


class ProgressBar(Callback):
    """A tqdm bar on stderr (steps, or seconds of a time budget) with the loss and tokens/s, when
    ``config.progress`` and tqdm is installed; in the first process only."""

    def __init__(self) -> None:
        self.bar = None

    def start(self, trainer: Trainer) -> None:
        c = trainer.config
        if not (c.progress and trainer.rank == 0):
            return
        try:
            tqdm = require("tqdm.auto", "the progress bar").tqdm
        except ImportError:  # no bar: the log lines still say how far the run is
            return
        total = c.max_steps if c.max_steps else int(c.time_budget)
        self.bar = tqdm(total=total, initial=trainer.step if c.max_steps else int(trainer.elapsed),
                        unit="step" if c.max_steps else "s", dynamic_ncols=True, leave=False,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}{postfix}]")

    def log(self, trainer: Trainer, row: dict) -> None:
        if self.bar is None:
            return
        c = trainer.config
        self.bar.n = trainer.step if c.max_steps else min(int(trainer.elapsed), int(c.time_budget))
        self.bar.set_postfix_str(f"loss {row['train_loss']:.3f}{trainer.objective_label}, "
                                 f"{trainer.tokens_per_s:,.0f} tok/s", refresh=True)

    def write(self, message: str) -> bool:
        if self.bar is None:
            return False
        self.bar.write(message, file=sys.stdout)
        sys.stdout.flush()
        return True

    def finish(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar = None


class MetricsLog(Callback):
    """metrics.csv (continued on resume) and TensorBoard event files when ``tensorboard`` is installed; written by
    the first process only.

    Opening it keeps the header and the complete rows up to the step the run starts from and nothing else, so
    whatever a kill left behind (an empty file, a torn last line, rows logged after the checkpoint the run
    resumes from) the file reads as one run with each step once."""

    def __init__(self) -> None:
        self.file = self.writer = self.tb = None

    @staticmethod
    def rows_up_to(path: Path, step: int) -> list[dict]:
        """The complete rows of ``path`` logged at or before ``step``."""
        if not path.is_file():
            return []
        lines = path.read_text().splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):
            lines.pop()  # a row cut short by a kill
        rows = []
        for record in csv.reader(lines):
            if not len(CSV_FIELDS) - ADDED_FIELDS <= len(record) <= len(CSV_FIELDS):  # a garbled row
                continue
            row = dict(zip(CSV_FIELDS, record + [""] * (len(CSV_FIELDS) - len(record)), strict=True))
            if not row["step"].isdigit():  # the header
                continue
            if int(row["step"]) <= step:
                rows.append(row)
        return rows

    def start(self, trainer: Trainer) -> None:
        if trainer.rank != 0:
            return
        path = trainer.out_dir / "metrics.csv"
        rows = self.rows_up_to(path, trainer.step)
        text = [",".join(CSV_FIELDS) + "\r\n"] + [",".join(row[k] for k in CSV_FIELDS) + "\r\n" for row in rows]
        write_atomic(path, "".join(text).encode())
        self.file = path.open("a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=CSV_FIELDS)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(trainer.out_dir / "tensorboard"))
        except ImportError:
            self.tb = None

    def log(self, trainer: Trainer, row: dict) -> None:
        if self.file is None:
            return
        fault_point("metrics:before-row")
        try:
            self.writer.writerow(row)
            self.file.flush()
        except OSError as err:  # a full disk: one line naming what the run kept, as a failed checkpoint save says
            raise CheckpointNotSaved(f"could not write a row of {self.file.name} ({err.strerror or err}); "
                                     f"{_kept(trainer.out_dir)}") from None
        if self.tb is not None:
            for key in ("train_loss", "val_loss", "lr", "tokens_per_s"):
                if key in row:
                    self.tb.add_scalar(key, row[key], row["step"])

    def finish(self, trainer: Trainer) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError:  # the row it still holds could not be written: log() has said so
                pass
        if self.tb is not None:
            self.tb.close()
        self.file = self.writer = self.tb = None


def _kept(run_dir: Path) -> str:
    """What a run that cannot write any more is left with, and how to go on (the words of a failed save)."""
    try:
        kept = resolve_checkpoint(run_dir)
    except OSError:
        kept = None
    if kept is None or not (kept / "config.json").is_file():
        return "no checkpoint of this run was kept: free some space and start it again"
    return f"the run is kept as it was at {kept}: free some space, then continue it with --resume {run_dir}"


class LossCurve(Callback):
    """loss.png beside metrics.csv at the end of a completed run (``trainer.loss_curve``), when matplotlib can
    draw it."""

    def end(self, trainer: Trainer) -> None:
        if trainer.rank != 0:
            return
        try:
            trainer.loss_curve = plot_loss_curve(trainer.out_dir / "metrics.csv", trainer.out_dir / "loss.png")
        except ImportError:
            trainer.loss_curve = None


def default_callbacks() -> list[Callback]:
    """What every ``qkv train`` run does: stop on a signal, log metrics, show progress, draw the loss curve."""
    return [StopOnSignal(), MetricsLog(), ProgressBar(), LossCurve()]


def plot_loss_curve(csv_path: str | Path, png_path: str | Path, dpi: int = 120) -> Path:
    """Training and validation loss against the trainer's clock, from metrics.csv → ``png_path``.

    Drawn with matplotlib alone (``ImportError`` naming the extra without it): training sits below qkv.viz and
    does not import it. The picture is written atomically, so a kill or a full disk never leaves half of one."""
    require("matplotlib", "the loss curve").use("Agg", force=False)  # no display needed
    plt = require("matplotlib.pyplot", "the loss curve")
    rows = list(csv.DictReader(Path(csv_path).open()))
    fig, ax = plt.subplots(figsize=(7, 4))
    try:
        smoothing = float(rows[-1].get("label_smoothing") or 0) if rows else 0.0
        labels = {"train_loss": f"training objective (label-smoothed {smoothing:g})" if smoothing else "train loss",
                  "val_loss": "validation loss"}
        for key, style in (("train_loss", "-"), ("val_loss", "o-")):
            points = [(float(r["elapsed_s"]), float(r[key])) for r in rows if r.get(key)]
            if points:
                ax.plot(*zip(*points, strict=True), style, label=labels[key], markersize=3)
        ax.set_xlabel("seconds (trainer's clock)")
        ax.set_ylabel("cross-entropy (nats per token)")
        if rows:
            ax.set_title(f"{rows[-1]['step']} steps, {int(rows[-1]['tokens']):,} tokens")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        picture = io.BytesIO()
        fig.savefig(picture, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    write_atomic(Path(png_path), picture.getvalue())
    return Path(png_path)
