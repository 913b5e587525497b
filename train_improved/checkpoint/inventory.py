"""The mirror's inventory: what its manifest lists, and the pure rules that decide it.

    entries = plan_manifest(local=uploaded_local_entries, remote=manifest, retention=Retention(keep_rolling=10))

The manifest is the mirror's own inventory, not a copy of one machine's directory: the family
policies of the local store (keep-last-N rolling and emergency, the best triple, the K best
evaluations, epochs forever)
are applied to the union of what either tier holds. So the first sync of a run resumed on a new
machine, whose disk holds one downloaded file, deletes nothing those policies keep; nor does a
local file that is damaged or was deleted by hand. No I/O here: `mirror` performs what this decides.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import layout
from .fallback import saved_time
from .layout import Family
from .lineage import Line
from .retention import keep_best_n, keep_last

_BEST_NAMES = (layout.BEST, layout.BEST_BACKUP, layout.BEST_PREVIOUS)


@dataclass(frozen=True)
class ObjectRef:
    """One verified object of the mirror."""

    key: str  # relative to the mirror's root
    bytes: int


@dataclass(frozen=True)
class Entry:
    """One name of the manifest. A sharded checkpoint's `key` is its state.pt; `files` are its DCP files."""

    name: str
    key: str
    digest: str
    bytes: int
    step: int | None
    kind: str | None
    saved_at: str | None
    files: dict[str, dict[str, Any]] | None = None  # file name -> {"key", "digest", "bytes"}
    lineage: dict[str, Any] | None = None  # the footer's line of training (run, ancestry)
    metrics: dict[str, float] | None = None  # a top-K file's metrics, which rank it (keep_best)
    ok = True  # a class constant, not a field: listed means verified (the fallback chain reads `ok` and `meta`)

    @classmethod
    def from_dict(cls, name: str, data: dict[str, Any]) -> Entry:
        """An entry as a manifest stores it; keys this version does not know (a newer minor addition) are ignored."""
        known = {f.name for f in dataclasses.fields(cls)} - {"name"}
        return cls(name, **{k: v for k, v in data.items() if k in known})

    def as_dict(self) -> dict[str, Any]:
        out = {"key": self.key, "digest": self.digest, "bytes": self.bytes, "step": self.step, "kind": self.kind,
               "saved_at": self.saved_at}
        if self.files is not None:
            out["files"] = self.files
        if self.lineage is not None:
            out["lineage"] = self.lineage
        if self.metrics is not None:
            out["metrics"] = self.metrics
        return out

    def objects(self) -> dict[str, ObjectRef]:
        """digest -> object, for every object this entry needs."""
        return {self.digest: ObjectRef(self.key, self.bytes),
                **{f["digest"]: ObjectRef(f["key"], f["bytes"]) for f in (self.files or {}).values()}}

    @property
    def total_bytes(self) -> int:
        return self.bytes + sum(f["bytes"] for f in (self.files or {}).values())

    @property
    def meta(self) -> dict[str, Any]:
        """What the fallback chain reads of a footer: the step and the line of training."""
        return {"step": self.step, "lineage": self.lineage, "saved_at": self.saved_at}

    def renamed(self, name: str) -> Entry:
        return dataclasses.replace(self, name=name)


def keys(entries: Mapping[str, Entry]) -> set[str]:
    """Every object a manifest's entries need."""
    return {ref.key for e in entries.values() for ref in e.objects().values()}


@dataclass(frozen=True)
class Retention:
    """The local store's retention, which the mirror applies to both tiers together."""

    keep_rolling: int = 10
    keep_emergency: int = 10
    keep_best: int = 0
    metric: str = "val_loss"
    mode: str = "min"

    @classmethod
    def of(cls, options: Any) -> Retention:
        """From CheckpointOptions."""
        return cls(options.keep_rolling, options.keep_emergency, options.keep_best, options.metric, options.mode)


def plan_manifest(local: Mapping[str, Entry], remote: Mapping[str, Entry], retention: Retention) -> dict[str, Entry]:
    """The next manifest: the local store's uploaded names over the mirror's, each family's policy on the union.

    `local`: entries for the local store's readable checkpoints whose objects are up (a name the
    local store holds is its newest content). `remote`: the manifest now. Every name `local` holds
    stays listed (the local store applied the policy to it, or protects it); a name only the mirror
    holds stays while its family's policy, applied to both tiers together, keeps it.
    """
    union = {**remote, **local}
    latest = union.get(layout.LATEST)
    line = Line.of({"lineage": latest.lineage}) if latest is not None and latest.lineage else None

    def on_line(e: Entry) -> bool:
        return line is None or line.holds({"lineage": e.lineage, "step": e.step})

    out = {n: e for n, e in union.items() if layout.parse_name(n) is not None}
    # latest_backup.pt is the previous latest of this line. A run resumed on a new machine has no
    # local backup before its second save: the mirror's latest it replaced is that backup.
    before = remote.get(layout.LATEST)
    if (layout.LATEST_BACKUP not in local and layout.LATEST in local and before is not None
            and before.step != local[layout.LATEST].step and on_line(before)):
        out[layout.LATEST_BACKUP] = before.renamed(layout.LATEST_BACKUP)

    for family, keep in ((Family.ROLLING, retention.keep_rolling), (Family.EMERGENCY, retention.keep_emergency)):
        members = sorted((e for n, e in out.items() if n not in layout.ALIASES and _family(n) is family),
                         key=lambda e: (on_line(e), e.step or -1, saved_time(e)))
        for e, kept in zip(members, keep_last(keep)(members), strict=True):
            if not kept and e.name not in local:
                del out[e.name]

    # The K best evaluations (best_step_*.pt) of both tiers, by the metric that ranks them now.
    tops = [e for n, e in out.items() if _family(n) is Family.TOP] if retention.keep_best else []
    values = [((e.metrics or {}).get(retention.metric), e.step or 0) for e in tops]
    for e, kept in zip(tops, keep_best_n(retention.keep_best, retention.mode)(values), strict=True):
        if not kept and e.name not in local:
            del out[e.name]

    # The best triple: the newest best checkpoint of either tier is best_model.pt (and its backup),
    # the one before it best_model_previous.pt, as the local store rotates them.
    bests = {tier[n].digest: tier[n] for tier in (remote, local) for n in _BEST_NAMES if n in tier}
    newest = sorted(bests.values(), key=saved_time, reverse=True)
    for n in _BEST_NAMES:
        out.pop(n, None)
    if newest:
        out[layout.BEST] = newest[0].renamed(layout.BEST)
        out[layout.BEST_BACKUP] = newest[0].renamed(layout.BEST_BACKUP)
    if len(newest) > 1:
        out[layout.BEST_PREVIOUS] = newest[1].renamed(layout.BEST_PREVIOUS)
    return out


def _family(name: str) -> Family | None:
    parsed = layout.parse_name(name)
    return parsed.family if parsed else None
