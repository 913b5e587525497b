"""One save's work in the writer thread: write, commit, move latest, apply retention, log history.

The manager decides what to save and hands the writer a `SaveContext` (everything the commit
needs, fixed when the save started); the functions here carry out the commit order given in the
manager's docstring. Bytes go through `storage`; nothing here decides policy beyond that order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from . import fileformat, layout, storage
from .best import BestTracker
from .fileformat import CheckpointError
from .layout import Family, Kind
from .lineage import Line
from .records import CheckpointOptions, SaveResult, describe, scan
from .retention import keep_best_n, keep_last, to_delete
from .storage import PendingShards, Shards

logger = logging.getLogger("train_improved.checkpoint")


@dataclass(frozen=True)
class SaveContext:
    directory: Path
    options: CheckpointOptions
    line: Line  # the line of training this save continues
    parent: dict[str, Any] | None  # the checkpoint the run resumed from, recorded in every footer
    parent_path: Path | None
    protected: frozenset[str]  # names retention must never delete (the file resumed from)
    best: BestTracker  # read here for the footers' `best` record; moved by the manager after the commit
    release: Callable[[Path], None]  # a staging directory handed out by the manager is gone
    without_copy: frozenset[Kind] = frozenset()  # kinds saved without their independent copy (a nearly full disk)


def commit(ctx: SaveContext, snapshot: dict[str, Any], step: int, epoch: int | None, kinds: Sequence[Kind],
           metrics: dict[str, float], meta: dict[str, Any], stall: float, verify: bool = True,
           shards: Shards | PendingShards | None = None) -> list[SaveResult]:
    """Commit `snapshot` as each of `kinds`; one SaveResult per kind (a failure is a result, never raised)."""
    began = time.perf_counter()
    try:
        if isinstance(shards, PendingShards):
            try:
                shards = shards.wait()  # every rank's files are durable: part of this save's write_s
            except CheckpointError as e:
                return [_failed(ctx, kind, final_name(kind, step, epoch, datetime.now()), step, stall, e)
                        for kind in kinds]
        return _commit_each(ctx, snapshot, step, epoch, kinds, metrics, meta, stall, verify, shards, began)
    finally:
        if shards is not None:
            delete(ctx, [shards.directory])  # every checkpoint directory holds its own links to them


def discard(ctx: SaveContext, shards: PendingShards) -> None:
    """Delete the shards of a skipped save once every rank has finished writing them."""
    try:
        shards.wait()
    except CheckpointError:
        pass  # a skipped save: its shards are deleted either way
    delete(ctx, [shards.directory])


def final_name(kind: Kind, step: int, epoch: int | None, now: datetime) -> str:
    if kind is Kind.ROLLING:
        return layout.rolling_name(step)
    if kind is Kind.EMERGENCY:
        return layout.emergency_name(step, now)
    if kind is Kind.EPOCH:
        assert epoch is not None  # save() refused it otherwise
        return layout.epoch_name(epoch)
    if kind is Kind.TOP:
        return layout.top_name(step)
    return layout.BEST


def footer(ctx: SaveContext, kind: Kind, name: str, step: int, epoch: int | None, metrics: dict[str, float],
           meta: dict[str, Any], saved_at: str, best: tuple[float, int] | None) -> dict[str, Any]:
    import torch

    return dict(meta, name=name, kind=kind.value, step=step, epoch=epoch, metrics=metrics, saved_at=saved_at,
                torch_version=str(torch.__version__), lineage=ctx.line.footer(ctx.parent), best=ctx.best.record(best))


def _failed(ctx: SaveContext, kind: Kind, name: str, step: int, stall: float, error: CheckpointError) -> SaveResult:
    logger.warning("checkpoint %s was not saved: %s; earlier checkpoints are intact", name, error)
    history(ctx.directory, {"event": "failed", "name": name, "kind": kind.value, "step": step, "error": str(error)})
    return SaveResult(kind, name, step, stall_s=stall, error=str(error))


def _commit_each(ctx: SaveContext, snapshot: dict[str, Any], step: int, epoch: int | None, kinds: Sequence[Kind],
                 metrics: dict[str, float], meta: dict[str, Any], stall: float, verify: bool,
                 shards: Shards | None, began: float) -> list[SaveResult]:
    import torch

    results = []
    best = ctx.best.best  # what each footer records as the best so far on this line
    for kind in kinds:
        started = began if not results else time.perf_counter()
        now = datetime.now()
        name = final_name(kind, step, epoch, now)
        result = SaveResult(kind, name, step, stall_s=stall)
        saved_at = now.astimezone().isoformat(timespec="microseconds")
        payload = dict(snapshot, checkpoint_type=kind.value, timestamp=saved_at,
                       format_version=fileformat.FORMAT_VERSION, torch_version=str(torch.__version__))
        new_best = (metrics[ctx.options.metric], step) if kind is Kind.BEST else best
        displaced: list[Path] = []  # files the renames replaced, deleted once this one is committed
        try:
            result.bytes = _write_family(ctx, kind, ctx.directory / name, payload,
                                         footer(ctx, kind, name, step, epoch, metrics, meta, saved_at, new_best),
                                         verify, shards, displaced)
            _point_latest_to(ctx, ctx.directory / name, step, displaced)
        except CheckpointError as e:
            delete(ctx, displaced)
            results.append(_failed(ctx, kind, name, step, stall, e))
            continue
        best = new_best
        result.write_s = time.perf_counter() - started  # committed: durable, verified, latest points here
        deleted = prune(ctx, kind, step)
        delete(ctx, displaced)
        result.cleanup_s = time.perf_counter() - started - result.write_s
        result.file_bytes = fileformat.checkpoint_size(ctx.directory / name)
        history(ctx.directory, {"event": "save", "name": name, "kind": kind.value, "step": step, "epoch": epoch,
                                "bytes": result.bytes, "stall_s": stall, "write_s": result.write_s,
                                "cleanup_s": result.cleanup_s, "metrics": metrics, "saved_at": saved_at,
                                "run": ctx.line.run})
        for gone in deleted:
            history(ctx.directory, {"event": "delete", "name": gone, "kind": kind.value, "step": step})
        results.append(result)
    return results


def delete(ctx: SaveContext, temporaries: list[Path]) -> None:
    """Remove files or directories under temporary names (displaced checkpoints, used shards)."""
    for path in temporaries:
        try:
            storage.remove(path)
        except OSError as e:  # a leftover temporary name: the next writing open removes it
            logger.warning("could not remove %s: %s", path.name, e)
        ctx.release(path)


def _write_family(ctx: SaveContext, kind: Kind, path: Path, payload: dict[str, Any], meta: dict[str, Any],
                  verify: bool, shards: Shards | None, displaced: list[Path]) -> int:
    """Write one checkpoint plus its family's backup; return the bytes it holds (shards included)."""
    d = ctx.directory
    backups = {Kind.ROLLING: [d / layout.ROLLING_BACKUP], Kind.BEST: [d / layout.BEST_BACKUP]}.get(kind, [])
    if kind in ctx.without_copy:
        backups = []
    # The old best becomes best_model_previous.pt first, so that at every instant (a kill -9 included)
    # it has a final name. If the new best then fails, the older previous is put back: nothing changed.
    older: list[Path] = []  # the previous best_model_previous.pt, under a temporary name until committed
    moved = kind is Kind.BEST and path.exists()
    had_previous = (d / layout.BEST_PREVIOUS).exists()
    if moved:
        storage.link_checkpoint(path, d / layout.BEST_PREVIOUS, older)
    try:
        storage.write_checkpoint(path, payload, meta, verify=verify, copies=backups, shards=shards,
                                 displaced=displaced)
    except CheckpointError:
        if moved:
            _put_back_previous(ctx, older, had_previous)
        raise
    displaced.extend(older)
    return (1 + len(backups)) * fileformat.checkpoint_size(path)


def _put_back_previous(ctx: SaveContext, older: list[Path], had_previous: bool) -> None:
    """Undo the move of the old best to best_model_previous.pt after the new best failed."""
    previous = ctx.directory / layout.BEST_PREVIOUS
    try:
        if older:
            storage.commit_temporary(older[0], previous)
        elif not had_previous:
            storage.remove(previous)
    except (CheckpointError, OSError) as e:  # the best itself is untouched; only the older previous is lost
        logger.warning("%s could not be put back after the failed best save: %s", layout.BEST_PREVIOUS, e)


def _point_latest_to(ctx: SaveContext, path: Path, step: int, displaced: list[Path]) -> None:
    latest = ctx.directory / layout.LATEST
    try:
        current = describe(latest)
    except FileNotFoundError:
        current = None
    # latest_backup.pt keeps the previous *step* of this line of training: a second save at the
    # same step (best and rolling together) re-points latest only; a latest from another line
    # (this run resumed an earlier step) is not this run's past: the state it resumed from is.
    # A damaged latest is replaced, never rotated over the backup.
    if current is not None and current.ok and current.step != step:
        if ctx.line.holds(current.meta):
            storage.link_checkpoint(latest, ctx.directory / layout.LATEST_BACKUP, displaced)
        elif ctx.parent_path is not None and ctx.parent_path.exists():
            storage.link_checkpoint(ctx.parent_path, ctx.directory / layout.LATEST_BACKUP, displaced)
    storage.link_checkpoint(path, latest, displaced)


def prune(ctx: SaveContext, kind: Kind, step: int, keep: int | None = None) -> list[str]:
    """Apply the family's retention (or keep only the newest `keep`); a file that cannot be deleted is a
    warning, never a failed save."""
    if kind is Kind.TOP:
        return _remove(ctx, kind, step, top_to_delete(ctx.directory, ctx.options, ctx.protected))
    keep = keep or {Kind.ROLLING: ctx.options.keep_rolling, Kind.EMERGENCY: ctx.options.keep_emergency}.get(kind)
    if keep is None:
        return []  # best and epoch files are never rotated
    family = Family.ROLLING if kind is Kind.ROLLING else Family.EMERGENCY
    files = []
    for info in scan(ctx.directory):
        parsed = layout.parse_name(info.name)
        if parsed and parsed.family is family and parsed.step is not None:
            # Files of an abandoned line of training count as older than any of this line's.
            files.append((ctx.line.holds(info.meta), parsed.step, parsed.saved or datetime.min, info.path))
    files.sort()
    doomed = [p for *_, p in to_delete(files, keep_last(keep), protected=lambda f: f[-1].name in ctx.protected)]
    return _remove(ctx, kind, step, doomed)


def top_values(directory: Path, metric: str) -> list[tuple[float | None, int, Path]]:
    """The top-K files (keep_best) as (their value of `metric`, step, path); None where the footer has none."""
    out = []
    for info in scan(directory):
        parsed = layout.parse_name(info.name)
        if info.ok and parsed is not None and parsed.family is Family.TOP and parsed.step is not None:
            value = (info.meta.get("metrics") or {}).get(metric)
            out.append((float(value) if isinstance(value, (int, float)) else None, parsed.step, info.path))
    return out


def top_to_delete(directory: Path, options: CheckpointOptions, protected: Collection[str] = ()) -> list[Path]:
    """The top-K files beyond the `keep_best` best by the metric (a file ranked by another metric goes first)."""
    files = top_values(directory, options.metric)
    policy = keep_best_n(options.keep_best, options.mode)
    return [p for *_, p in to_delete(files, policy, protected=lambda f: f[-1].name in protected)]


def _remove(ctx: SaveContext, kind: Kind, step: int, doomed: list[Path]) -> list[str]:
    deleted = []
    for p in doomed:
        try:
            storage.remove(p)
        except OSError as e:
            reason = fileformat.describe_os_error(e)
            logger.warning("retention could not delete %s: %s; training goes on", p.name, reason)
            history(ctx.directory, {"event": "delete_failed", "name": p.name, "kind": kind.value, "step": step,
                                    "error": reason})
            continue
        deleted.append(p.name)
    return deleted


def history(directory: Path, record: dict[str, Any]) -> None:
    """Append one record to history.jsonl (a failure to log is a warning, never a failed save)."""
    record["time"] = time.time()
    try:
        storage.append_line(directory / layout.HISTORY, record)
    except OSError as e:
        logger.warning("could not append to %s: %s", layout.HISTORY, e)
