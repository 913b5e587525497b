"""File names of the checkpoint directory (SPEC §4): one function makes each name, one parses them.

Users script against these names, so they are fixed:

    latest.pt, latest_backup.pt
    rolling_step_000250.pt, rolling_last_backup.pt
    emergency_step_000250_20261126_231500.pt
    best_model.pt, best_model_backup.pt, best_model_previous.pt
    best_step_000250.pt                      (with keep_best K: the K best evaluations by the metric)
    epoch_00003.pt
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import Enum

SUFFIX = ".pt"
LATEST = "latest.pt"
LATEST_BACKUP = "latest_backup.pt"
ROLLING_BACKUP = "rolling_last_backup.pt"
BEST = "best_model.pt"
BEST_BACKUP = "best_model_backup.pt"
BEST_PREVIOUS = "best_model_previous.pt"
HISTORY = "history.jsonl"
LOCK = ".lock"


class Kind(str, Enum):
    """Why a checkpoint was written; each kind is its own family with its own retention."""

    ROLLING = "rolling"
    EMERGENCY = "emergency"
    BEST = "best"
    EPOCH = "epoch"
    TOP = "top"  # one of the K best evaluations (keep_best)


class Family(str, Enum):
    """How the lister groups files."""

    LATEST = "latest"
    BEST = "best"
    ROLLING = "rolling"
    EMERGENCY = "emergency"
    EPOCH = "epoch"
    TOP = "top"


_ROLLING_RE = re.compile(r"^rolling_step_(\d{6,})\.pt$")
_EMERGENCY_RE = re.compile(r"^emergency_step_(\d{6,})_(\d{8}_\d{6})\.pt$")
_EPOCH_RE = re.compile(r"^epoch_(\d{5,})\.pt$")
_TOP_RE = re.compile(r"^best_step_(\d{6,})\.pt$")
_FIXED = {
    LATEST: Family.LATEST,
    LATEST_BACKUP: Family.LATEST,
    ROLLING_BACKUP: Family.ROLLING,
    BEST: Family.BEST,
    BEST_BACKUP: Family.BEST,
    BEST_PREVIOUS: Family.BEST,
}
BACKUP_NAMES = frozenset({LATEST_BACKUP, ROLLING_BACKUP, BEST_BACKUP})
# Names that point at another name's checkpoint and are moved by the next save: never the name a
# checkpoint is kept under, and never counted by retention (they follow what they point at).
ALIASES = BACKUP_NAMES | {LATEST}


@dataclass(frozen=True)
class ParsedName:
    family: Family
    step: int | None = None  # from the name, for rolling, emergency and top-K files
    epoch: int | None = None  # from the name, for epoch files
    saved: datetime | None = None  # from the name, for emergency files


def rolling_name(step: int) -> str:
    return f"rolling_step_{step:06d}{SUFFIX}"


def emergency_name(step: int, when: datetime) -> str:
    return f"emergency_step_{step:06d}_{when:%Y%m%d_%H%M%S}{SUFFIX}"


def top_name(step: int) -> str:
    return f"best_step_{step:06d}{SUFFIX}"


def epoch_name(epoch: int) -> str:
    return f"epoch_{epoch:05d}{SUFFIX}"


def parse_name(name: str) -> ParsedName | None:
    """What a file name in the checkpoint directory means, or None for names the store doesn't own."""
    if name in _FIXED:
        return ParsedName(_FIXED[name])
    if m := _ROLLING_RE.match(name):
        return ParsedName(Family.ROLLING, step=int(m[1]))
    if m := _EMERGENCY_RE.match(name):
        return ParsedName(Family.EMERGENCY, step=int(m[1]), saved=datetime.strptime(m[2], "%Y%m%d_%H%M%S"))
    if m := _EPOCH_RE.match(name):
        return ParsedName(Family.EPOCH, epoch=int(m[1]))
    if m := _TOP_RE.match(name):
        return ParsedName(Family.TOP, step=int(m[1]))
    return None


def is_explicit_path(name: str) -> bool:
    """`--resume` names with a path separator or a leading '.' or '~' are paths; others live in the directory."""
    return os.sep in name or name.startswith((".", "~"))


def stable_name(names: Iterable[str]) -> str | None:
    """Of the names that hold one checkpoint, the one it is kept under; None if only aliases hold it.

    A rolling, emergency or epoch name is never reused; best_model.pt becomes best_model_previous.pt
    at the next best. Aliases (latest.pt and the backups) are overwritten by the next save, so a
    checkpoint downloaded from the mirror never takes one, and the uploader reads it under this name.
    """
    rank = {BEST: 1, BEST_PREVIOUS: 2}
    owned = [n for n in names if n not in ALIASES and parse_name(n)]
    return min(owned, key=lambda n: (rank.get(n, 0), n)) if owned else None
