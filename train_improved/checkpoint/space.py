"""Who gets the disk when it is short: a pure plan over the kinds of one save.

    files, copies = fit([Kind.ROLLING, Kind.BEST], per_file=452_000, budget=900_000)
    # -> ([ROLLING, BEST], []): both states are durable, neither independent copy fits

Durability before redundancy: every kind's own file first, in PRIORITY order (an emergency state
first, then the rolling one a preempted run resumes from), then the independent copies of rolling
and best saves with what is left. The manager measures the budget, frees what policy allows when
the plan falls short, and says what it gave up.
"""

from __future__ import annotations

from collections.abc import Sequence

from .layout import Kind

PRIORITY = (Kind.EMERGENCY, Kind.ROLLING, Kind.EPOCH, Kind.BEST, Kind.TOP)
WITH_COPY = (Kind.ROLLING, Kind.BEST)  # written with an independent copy: rolling_last_backup, best_model_backup
LOW_DISK_ROLLING = 2  # rolling checkpoints kept, whatever keep_rolling says, when a save would not fit otherwise


def fit(kinds: Sequence[Kind], per_file: int, budget: int) -> tuple[list[Kind], list[Kind]]:
    """The kinds whose file fits in `budget` bytes, then those of them whose copy fits in what is left."""
    files, copies = [], []
    for k in sorted(kinds, key=PRIORITY.index):
        if per_file <= budget:
            files.append(k)
            budget -= per_file
    for k in sorted(files, key=PRIORITY.index):
        if k in WITH_COPY and per_file <= budget:
            copies.append(k)
            budget -= per_file
    return files, copies


def complete(kinds: Sequence[Kind], files: Sequence[Kind], copies: Sequence[Kind]) -> bool:
    """Whether a plan gives every kind its file and every copy."""
    return len(files) == len(kinds) and len(copies) == sum(k in WITH_COPY for k in kinds)
