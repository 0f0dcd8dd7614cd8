"""Studies that answer a learner's questions with numbers: ``qkv study positions | order | scale | scaling``.

Each study is a function that trains or builds small qkv models, returns a :class:`StudyResult` (tables of
measurements and the settings behind them) and writes ``results.md``, ``results.csv`` and PNG plots into
``<out_dir>/<name>/``. ``quick=True`` shrinks everything to seconds (the tests run it); the full mode is what
``docs/results/study.md`` reports.
"""

from .order import order_study
from .positions import positions_study
from .report import StudyResult
from .scale import scale_study
from .scaling import scaling_study

__all__ = ["StudyResult", "positions_study", "order_study", "scale_study", "scaling_study", "STUDIES"]

STUDIES = {"positions": positions_study, "order": order_study, "scale": scale_study, "scaling": scaling_study}
