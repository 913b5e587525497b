"""Lineage: which checkpoints belong to the line of training that a run continues.

A run that resumes from an older checkpoint starts a branch: the files written after that step by
the run it left are another line of training, however new they are. Every save records its line
in the footer:

    "lineage": {"run": "9f2c1a7e", "ancestry": [["41d0be33", 80]], "parent": {"run": ..., "step": 80, "name": ...}}

meaning: written by run 9f2c1a7e, which continued run 41d0be33 from its step 80. A checkpoint is
on that line if it was written by the run itself, or by an ancestor at or before the step where the
line left it. The fallback chain, best tracking and latest_backup.pt stay on the current line.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any


def new_run_id() -> str:
    return secrets.token_hex(4)


@dataclass(frozen=True)
class Line:
    run: str
    ancestry: tuple[tuple[str, int], ...] = ()  # (earlier run, last step taken from it), nearest first

    @classmethod
    def of(cls, meta: dict[str, Any]) -> Line | None:
        """The line a checkpoint was written on, from its footer; None for files from before lineage."""
        lineage = meta.get("lineage")
        if not isinstance(lineage, dict) or not isinstance(lineage.get("run"), str):
            return None
        return cls(lineage["run"], tuple((str(r), int(s)) for r, s in lineage.get("ancestry") or []))

    def holds(self, meta: dict[str, Any]) -> bool:
        """Whether the checkpoint with this footer is on this line (a file without lineage counts as on it)."""
        other = Line.of(meta)
        if other is None or other.run == self.run:
            return True
        step = meta.get("step")
        return step is not None and any(other.run == run and step <= until for run, until in self.ancestry)

    def continued_by(self, run: str, step: int) -> Line:
        """The line of `run`, which resumes this line at `step`."""
        return Line(run, ((self.run, step), *self.ancestry))

    def footer(self, parent: dict[str, Any] | None) -> dict[str, Any]:
        return {"run": self.run, "ancestry": [list(a) for a in self.ancestry], "parent": parent}

    def describe(self, meta: dict[str, Any]) -> str:
        """Where a checkpoint off this line comes from, for a warning."""
        other = Line.of(meta)
        return f"run {other.run}" if other else "an unknown run"
