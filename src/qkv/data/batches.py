"""Batches planned one epoch at a time, so that batch number i is the same whenever it is asked for."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["PlannedBatches"]


class PlannedBatches:
    """Batches that a subclass plans per epoch, ``_plan(epoch)`` (lists of example indices, in the order they are
    served), and builds, ``make(indices)``. ``batch(index)`` is a pure function of the index (epoch =
    index // n_batches), which is what lets the trainer resume exactly; ``fixed(n)`` gives the first n batches of
    epoch 0 (validation). The subclass calls ``_plan_first_epoch()`` at the end of its ``__init__``."""

    n_batches: int

    def _plan(self, epoch: int) -> list[list[int]]:
        raise NotImplementedError

    def make(self, indices: Sequence[int]) -> Any:
        raise NotImplementedError

    def _plan_first_epoch(self) -> None:
        self._epoch: tuple[int, list[list[int]]] = (0, self._plan(0))  # the plan of the epoch being served
        self.n_batches = len(self._epoch[1])

    def _batches_of(self, epoch: int) -> list[list[int]]:
        if self._epoch[0] != epoch:
            self._epoch = (epoch, self._plan(epoch))
        return self._epoch[1]

    def batch(self, index: int) -> Any:
        """Training batch number ``index`` (epoch = index // n_batches)."""
        epoch, position = divmod(index, self.n_batches)
        return self.make(self._batches_of(epoch)[position])

    def fixed(self, n_batches: int) -> list:
        """The first ``n_batches`` batches of epoch 0 (all of them when there are fewer)."""
        return [self.make(b) for b in self._batches_of(0)[:n_batches]]

    def __len__(self) -> int:
        return self.n_batches
