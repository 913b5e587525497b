"""The store's plain records: its options, what a file is, what a save cost. No I/O policy here."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import fileformat, layout
from .fileformat import CheckpointError
from .layout import Family, Kind


class NoCheckpointError(CheckpointError):
    """The directory holds no checkpoint to resume from."""


@dataclass
class CheckpointOptions:
    """Everything the store can be told. Defaults follow SPEC §4."""

    keep_rolling: int = 10  # rolling step checkpoints; best, epoch and emergency are kept separately
    keep_emergency: int = 10  # emergency checkpoints have their own, independent retention
    save_every: int | None = 250  # steps between rolling saves (should_save); None never
    metric: str = "val_loss"  # the metric that decides best_model.pt
    mode: Literal["min", "max"] = "min"
    keep_best: int = 0  # also keep the K best evaluations by `metric` as best_step_NNNNNN.pt (0: only the best triple)
    min_free_bytes: int = 0  # a save is skipped rather than leave less free space than this
    async_save: bool = True  # stage to reused host buffers, write in a background thread
    storage_report_every: int = 10  # log storage per family every N saves
    safe_globals: tuple[Any, ...] = ()  # your own classes, allowed in a state on save and on restore
    mirror: str | None = None  # a second tier that survives the machine: any fsspec URL (s3://bucket/run, file://...)
    mirror_options: dict[str, Any] = field(default_factory=dict)  # fsspec storage options for it; never stored

    def __post_init__(self) -> None:
        problems = []
        if self.keep_rolling < 1:
            problems.append(f"keep_rolling must be at least 1 (got {self.keep_rolling})")
        if self.keep_best < 0:
            problems.append(f"keep_best cannot be negative (got {self.keep_best})")
        if self.keep_emergency < 1:
            problems.append(f"keep_emergency must be at least 1 (got {self.keep_emergency})")
        if self.save_every is not None and self.save_every < 1:
            problems.append(f"save_every must be a positive number of steps (got {self.save_every})")
        if self.mode not in ("min", "max"):
            problems.append(f"mode must be 'min' or 'max' (got {self.mode!r})")
        if not isinstance(self.metric, str) or not self.metric:
            problems.append(f"metric must be the name of a metric (got {self.metric!r})")
        if self.min_free_bytes < 0:
            problems.append(f"min_free_bytes cannot be negative (got {self.min_free_bytes})")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class CheckpointInfo:
    """One file of the store, described from its footer alone (no tensor is read)."""

    name: str
    path: Path
    family: Family
    size: int
    inode: int
    meta: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # why the footer could not be read; None when it could

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def step(self) -> int | None:
        return self.meta.get("step")

    @property
    def epoch(self) -> int | None:
        return self.meta.get("epoch")

    @property
    def kind(self) -> str | None:
        return self.meta.get("kind")

    @property
    def metrics(self) -> dict[str, float]:
        return self.meta.get("metrics") or {}

    @property
    def saved_at(self) -> str | None:
        return self.meta.get("saved_at")


@dataclass
class SaveResult:
    """What one file of a save cost, or why it failed: the trainer logs one record per result."""

    kind: Kind
    name: str
    step: int
    bytes: int = 0
    stall_s: float = 0.0  # time the caller was blocked
    write_s: float = 0.0  # time the writer spent until committed (serialize, checksum, fsync, verify, rename, latest)
    cleanup_s: float = 0.0  # after the commit: retention, and freeing the files the renames replaced
    file_bytes: int = 0  # one file of this save (bytes counts its backup too)
    error: str | None = None
    skipped: bool = False


def describe(path: Path) -> CheckpointInfo:
    """Describe one checkpoint (a file, or a sharded directory) from its footer."""
    parsed = layout.parse_name(path.name)
    family = parsed.family if parsed else Family.LATEST
    # A sharded directory is identified by its state.pt: latest.pt's hard links share that inode.
    carrier = fileformat.state_file(path)
    inode = os.stat(carrier if carrier.exists() else path).st_ino
    size = fileformat.checkpoint_size(path)
    try:
        return CheckpointInfo(path.name, path, family, size, inode, fileformat.read_footer(path))
    except CheckpointError as e:
        return CheckpointInfo(path.name, path, family, size, inode, error=str(e))


def scan(directory: Path) -> list[CheckpointInfo]:
    """Every checkpoint of a directory (valid or not), oldest step first, from footers alone."""
    if not directory.is_dir():
        return []
    infos = []
    for p in directory.iterdir():
        if p.suffix == layout.SUFFIX and layout.parse_name(p.name) and not p.is_symlink():
            try:
                infos.append(describe(p))
            except FileNotFoundError:
                continue  # pruned by the writer between listing and reading: it is gone
    return sorted(infos, key=lambda i: (i.step if i.step is not None else -1, i.saved_at or "", i.name))


def disk_usage(infos: Iterable[CheckpointInfo]) -> dict[Family, int]:
    """Bytes on disk per family, each inode counted once.

    latest*.pt are usually hard links to another family's file: they are counted last, so the
    owner pays. A sharded checkpoint's files are counted one by one: checkpoints of one step
    share their shards.
    """
    seen: set[int] = set()
    usage = {fam: 0 for fam in Family}
    for info in sorted(infos, key=lambda i: i.family is Family.LATEST):
        try:
            parts = [os.stat(f) for f in info.path.iterdir()] if info.path.is_dir() else [os.stat(info.path)]
        except FileNotFoundError:
            continue  # pruned by a running writer since it was listed: it uses no space any more
        for st in parts:
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                usage[info.family] += st.st_size
    return usage


def tensors_in(obj: Any) -> Iterator[Any]:
    """Every tensor in a nested state (dicts, lists, tuples).

    Duck-typed, so the store's read-only paths never import torch.
    """
    if hasattr(obj, "element_size") and hasattr(obj, "numel"):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_in(v)


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nested state (a DTensor counts its whole, unsharded size)."""
    return sum(t.element_size() * t.numel() for t in tensors_in(obj))


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
