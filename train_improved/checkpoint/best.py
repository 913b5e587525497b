"""The one best tracker of the store: the best value of `options.metric` on the current line of training.

    tracker = BestTracker("val_loss", "min")
    tracker.seed(resumed_footer, best_footers)     # after a restore, or at open
    tracker.is_improvement({"val_loss": 2.1})
    tracker.propose(2.1, step); ...; tracker.settle(committed=True)   # moves only once the best is committed

Every footer records the tracker's state (`best`: metric, mode, value, step), so a resumed run
continues the best of the checkpoint it resumed from, not of whatever `best_model.pt` holds (which
may belong to an abandoned branch), and a record kept for another metric or mode does not count.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from .validation import as_number

logger = logging.getLogger("train_improved.checkpoint")


class BestTracker:
    def __init__(self, metric: str, mode: str) -> None:
        self.metric, self.mode = metric, mode
        self.best: tuple[float, int] | None = None  # committed (value, step)
        self._pending: tuple[float, int] | None = None  # a best save in flight

    def seed(self, resumed: dict[str, Any] | None, best_files: list[dict[str, Any]], announce: bool = True) -> None:
        """The best so far: the resumed checkpoint's own record, else best_model.pt's (oldest format: its metric)."""
        self._pending = None
        for meta in ([resumed] if resumed is not None else []) + best_files:
            record = meta.get("best")
            if isinstance(record, dict):
                same = record.get("metric") == self.metric and record.get("mode") == self.mode
                if not same and meta is resumed and announce:
                    logger.info("best tracking starts again: the checkpoint tracked %s (%s), this run %s (%s)",
                                record.get("metric"), record.get("mode"), self.metric, self.mode)
                value = record.get("value")
                self.best = (float(value), int(record.get("step") or 0)) if same and value is not None else None
                return
            if meta is not resumed and self.metric in meta.get("metrics", {}):
                self.best = (meta["metrics"][self.metric], meta.get("step") or 0)  # a file from before records
                return
        self.best = None

    def is_improvement(self, metrics: dict[str, Any] | None) -> bool:
        value = as_number((metrics or {}).get(self.metric))
        if value is None or not math.isfinite(value):
            return False
        best = self._pending or self.best
        if best is None:
            return True
        return value < best[0] if self.mode == "min" else value > best[0]

    def propose(self, value: float, step: int) -> None:
        """A best save has started with this value."""
        self._pending = (value, step)

    def settle(self, committed: bool) -> None:
        """The best save finished: the tracker moves only if it committed."""
        if committed and self._pending is not None:
            self.best = self._pending
        self._pending = None

    def record(self, best: tuple[float, int] | None) -> dict[str, Any]:
        """What a footer keeps of the tracker, with `best` as the best so far."""
        return {"metric": self.metric, "mode": self.mode, "value": best[0] if best else None,
                "step": best[1] if best else None}
