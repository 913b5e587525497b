"""The fallback chain of SPEC §5: which files to try for a resume, in order, and loading the first good one.

Pure choice plus verified loading: no writes, no lock. The manager adds what it owns (protecting
the file it resumed from against retention).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from . import fileformat, layout
from .fileformat import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError
from .records import CheckpointInfo, NoCheckpointError

logger = logging.getLogger("train_improved.checkpoint")


def resolve(directory: Path, which: str | Path) -> Path:
    """Where `which` points: a bare name resolves inside `directory`, a path-like one is taken as given."""
    if isinstance(which, Path) or layout.is_explicit_path(which):
        return Path(which).expanduser()
    return directory / which


def candidates(directory: Path, which: str | Path, checkpoints: list[CheckpointInfo]) -> list[Path]:
    """Files to try, in order, for `which` = "latest", "best", a name or a path.

    `checkpoints` is what the directory holds (the manager's `all()`), used for "latest".
    """
    d = directory
    if which == "best":
        return [p for p in (d / layout.BEST, d / layout.BEST_BACKUP, d / layout.BEST_PREVIOUS) if p.exists()]
    if which == "latest":
        others = [i for i in checkpoints if i.name != layout.LATEST]
        # Newest state first, whatever its family: an independent rolling backup at a later step
        # beats latest_backup.pt at an earlier one. Unreadable files go last, to be reported.
        others.sort(key=lambda i: (i.ok, i.step or -1, i.saved_at or ""), reverse=True)
        head = [d / layout.LATEST] if (d / layout.LATEST).exists() else []
        return head + [i.path for i in others]
    path = resolve(d, which)
    if not path.exists():
        where = "" if path.parent != d else f" in {d}"
        raise CheckpointError(f"no checkpoint named {which}{where}")
    return [path]


def load_first_valid(paths: list[Path], directory: Path, map_location: Any = "cpu"
                     ) -> tuple[dict[str, Any], Path, dict[str, Any]]:
    """Load the first of `paths` that verifies, saying loudly why each one before it failed.

    Returns (state, path, footer). Raises NoCheckpointError if `paths` is empty and
    CheckpointError, listing every file and why, if none verifies.
    """
    if not paths:
        raise NoCheckpointError(f"no checkpoint to resume from in {directory}")
    failures = []
    for i, path in enumerate(paths):
        try:
            state, footer = fileformat.load_checkpoint(path, map_location=map_location)
        except (CorruptCheckpointError, UnsafeCheckpointError) as e:
            failures.append(f"{path.name}: {e}")
            nxt = f"; trying {paths[i + 1].name}" if i + 1 < len(paths) else ""
            logger.warning("%s failed verification: %s%s", path.name, e, nxt)
            continue
        if failures:
            logger.warning("resuming from %s (step %s) instead of %s", path.name, footer.get("step"), paths[0].name)
        return state, path, footer
    raise CheckpointError("no valid checkpoint to resume from: " + "; ".join(failures))
