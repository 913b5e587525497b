"""The fallback chain of SPEC §5: which files to try for a resume, in order, and loading the first good one.

Pure choice plus verified loading: no writes, no lock. The manager adds what it owns (protecting
the file it resumed from against retention, recording failed verifications in its history).

For "latest" the chain is the current line of training first (see `lineage`), newest step first,
then any other line, said loudly. The current line is that of the checkpoint saved last. So a
file committed just before a kill, whose save never got to move latest.pt, is found; and after a
run went back to an older step, the abandoned branch is never taken for the newest state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from . import fileformat, layout
from .fileformat import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError
from .lineage import Line
from .records import CheckpointInfo, NoCheckpointError

logger = logging.getLogger("train_improved.checkpoint")


@dataclass(frozen=True)
class Candidate:
    path: Path
    note: str = ""  # why this one is tried, when that needs saying (another line, newer than latest)


def resolve(directory: Path, which: str | Path) -> Path:
    """Where `which` points: a bare name resolves inside `directory`, a path-like one is taken as given."""
    if isinstance(which, Path) or layout.is_explicit_path(which):
        return Path(which).expanduser()
    return directory / which


def saved_time(info: CheckpointInfo | Any) -> datetime:
    """When a checkpoint (anything with `saved_at`: a CheckpointInfo, a mirror entry) was saved; oldest if unknown."""
    try:
        return datetime.fromisoformat(info.saved_at or "")
    except ValueError:
        return datetime.min.replace(tzinfo=datetime.now().astimezone().tzinfo)


def current_line(checkpoints: list[Any]) -> Line | None:
    """The line of the checkpoint saved last (readable ones only); None if it predates lineage."""
    readable = [i for i in checkpoints if i.ok]
    if not readable:
        return None
    return Line.of(max(readable, key=lambda i: (saved_time(i), i.step or -1)).meta)


def candidates(directory: Path, which: str | Path, checkpoints: list[CheckpointInfo]) -> list[Candidate]:
    """Files to try, in order, for `which` = "latest", "best", a name or a path.

    `checkpoints` is what the directory holds (the manager's `all()`), used for "latest".
    """
    d = directory
    if which == "best":
        return [Candidate(p) for p in (d / layout.BEST, d / layout.BEST_BACKUP, d / layout.BEST_PREVIOUS)
                if p.exists()]
    if which == "latest":
        return _latest_chain(d, checkpoints)
    path = resolve(d, which)
    if not path.exists():
        where = "" if path.parent != d else f" in {d}"
        raise CheckpointError(f"no checkpoint named {which}{where}")
    return [Candidate(path)]


def _latest_chain(d: Path, checkpoints: list[CheckpointInfo]) -> list[Candidate]:
    latest = next((i for i in checkpoints if i.name == layout.LATEST), None)
    chain = []
    if latest is not None and not latest.ok:
        chain.append(Candidate(latest.path))  # tried first so that its damage is reported by name
    chain += [Candidate(i.path, note) for i, note in latest_first(checkpoints)]
    chain += [Candidate(i.path) for i in checkpoints if not i.ok and i is not latest]
    return chain


def latest_first(checkpoints: list[Any]) -> list[tuple[Any, str]]:
    """The readable checkpoints in the order "latest" tries them, each with why, where that needs saying.

    The current line of training first, newest step first (at one step latest.pt, then originals),
    then any other line. One chain for both tiers: `checkpoints` are CheckpointInfo of the local
    store or the mirror's manifest entries (anything with name, step, meta, ok, saved_at).
    """
    line = current_line(checkpoints)
    latest = next((i for i in checkpoints if i.name == layout.LATEST and i.ok), None)

    def order(i: Any) -> tuple[Any, ...]:
        return (i.step or -1, i.name == layout.LATEST, i.name not in layout.BACKUP_NAMES, saved_time(i))

    readable = sorted((i for i in checkpoints if i.ok), key=order, reverse=True)
    on = [i for i in readable if line is None or line.holds(i.meta)]
    chain = []
    for i in on:
        note = ""
        if latest is not None and i.name != layout.LATEST and (i.step or -1) > (latest.step or -1):
            note = (f"newer than {layout.LATEST} (step {latest.step}): the run stopped after committing it, "
                    f"before {layout.LATEST} was moved")
        chain.append((i, note))
    for i in readable:
        if i not in on:
            where = line.describe(i.meta) if line else "another run"
            chain.append((i, f"from another line of training ({where}), abandoned when a run resumed from an "
                             "earlier step"))
    return chain


def load_first_valid(chain: list[Candidate], directory: Path, map_location: Any = "cpu",
                     on_failure: Callable[[Path, str], None] | None = None, safe_globals: list[Any] | None = None,
                     prepare: Callable[[Path], None] | None = None) -> tuple[dict[str, Any], Path, dict[str, Any]]:
    """Load the first candidate that verifies, saying loudly why each one before it failed.

    Returns (state, path, footer). Raises NoCheckpointError if `chain` is empty and
    CheckpointError, a summary line then every file and why, if none verifies. `on_failure(path,
    reason)` is told of each file that failed verification. `prepare(path)` runs before each
    candidate is loaded (fetching the shard files a sharded checkpoint keeps on the mirror); its
    CorruptCheckpointError is that candidate's failure.
    """
    if not chain:
        raise NoCheckpointError(f"no checkpoint to resume from in {directory}")
    failures = []
    for i, candidate in enumerate(chain):
        path = candidate.path
        try:
            if prepare is not None:
                prepare(path)
            state, footer = fileformat.load_checkpoint(path, map_location=map_location, safe_globals=safe_globals)
        except (CorruptCheckpointError, UnsafeCheckpointError) as e:
            failures.append(f"  {path.name}: {e}")
            if on_failure is not None:
                on_failure(path, str(e))
            nxt = f"; trying {chain[i + 1].path.name}" if i + 1 < len(chain) else ""
            if len(chain) > 1:  # a fallback story; a file asked for alone is the error itself, said once
                logger.warning("%s failed verification: %s%s", path.name, e, nxt)
            continue
        if candidate.note and "another line" in candidate.note:
            logger.warning("no valid checkpoint on the current line of training: resuming from %s (step %s), %s",
                           path.name, footer.get("step"), candidate.note)
        elif candidate.note:
            logger.warning("resuming from %s (step %s), %s", path.name, footer.get("step"), candidate.note)
        elif failures:
            logger.warning("resuming from %s (step %s) instead of %s", path.name, footer.get("step"),
                           chain[0].path.name)
        return state, path, footer
    if len(chain) == 1:  # one file was asked for by name: its failure, in one line
        raise CheckpointError(f"{chain[0].path} failed verification: {failures[0].split(': ', 1)[1]}")
    raise CheckpointError(f"no valid checkpoint to resume from in {directory}: all {len(failures)} failed "
                          "verification:\n" + "\n".join(failures))
