"""CheckpointManager: the policy layer of the store (layout, retention, best tracking, fallback).

    with CheckpointManager("checkpoints", CheckpointOptions(keep_rolling=3)) as ckpt:
        if ckpt.latest() is not None:
            state, info = ckpt.restore("latest")
        for step in range(start, end + 1):
            ...
            if ckpt.should_save(step):
                ckpt.save(my_state(), step=step, kinds=Kind.ROLLING)

It knows nothing about models: a state is a dict of plain data and tensors. Bytes go through
`storage`; this module decides names, order, and what may be deleted.

Commit order of one save (each line is durable before the next starts):
  0. with shards still being written by every rank (PendingShards), wait until all are durable;
  1. the new file and its independent backup (rolling and best) are written in one serialization
     pass under temporary names, fsynced, read back and verified; then the file is renamed (and
     the directory fsynced), then the backup;
  2. latest_backup.pt becomes the old latest (a hard link), then latest.pt the new file: the
     save is committed (its `write_s` ends);
  3. retention deletes what its family's policy drops, never a protected or foreign file, and the
     files the renames replaced (kept under temporary names until now) are deleted (`cleanup_s`);
  4. one line is appended to history.jsonl.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from datetime import datetime
from pathlib import Path
from typing import Any

from . import fallback, fileformat, layout, storage
from .fileformat import CheckpointError
from .layout import Family, Kind
from .lock import DirectoryLock
from .records import (
    CheckpointInfo,
    CheckpointOptions,
    NoCheckpointError,
    SaveResult,
    describe,
    disk_usage,
    human_bytes,
    tensor_bytes,
)
from .retention import keep_last, to_delete
from .storage import PendingShards, Shards

logger = logging.getLogger("train_improved.checkpoint")


class CheckpointManager:
    """Saves, rotates and restores the checkpoints of one directory. See the module docstring.

    A writing manager holds an exclusive lock on the directory for its lifetime; pass
    `read_only=True` to inspect or restore without it (the lister, tools, non-zero ranks).
    """

    def __init__(self, directory: str | Path, options: CheckpointOptions | None = None,
                 *, read_only: bool = False) -> None:
        self.directory = Path(directory)
        self.options = options or CheckpointOptions()
        self.read_only = read_only
        self._protected: set[str] = set()
        self._lock: DirectoryLock | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: Future[list[SaveResult]] | None = None
        self._done: list[SaveResult] = []
        self._jobs = 0
        self._last_file_bytes: int | None = None
        self.write_bandwidth: float | None = None  # bytes/s of the last committed save, all work included
        self._staging: Any = None
        if read_only:
            if not self.directory.is_dir():
                raise NoCheckpointError(f"checkpoint directory {self.directory} does not exist")
        else:
            self._open_for_writing()
        self._best_value = self._read_best_value()

    # ----------------------------------------------------------------------------- lifecycle

    def _open_for_writing(self) -> None:
        self._lock = DirectoryLock(self.directory)
        if removed := storage.clean_temp_files(self.directory):
            logger.warning("removed %d temporary file(s) left by an interrupted save in %s", len(removed),
                           self.directory)

    def close(self) -> None:
        """Wait for the save in flight, then release the directory."""
        if self._executor is not None:
            self.wait_until_finished()
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------- queries

    def all(self) -> list[CheckpointInfo]:
        """Every checkpoint file of the directory (valid or not), oldest step first. Reads footers only."""
        if not self.directory.is_dir():
            return []
        infos = [describe(p) for p in self.directory.iterdir()
                 if p.suffix == layout.SUFFIX and layout.parse_name(p.name) and not p.is_symlink()]
        return sorted(infos, key=lambda i: (i.step if i.step is not None else -1, i.saved_at or "", i.name))

    def _named(self, name: str) -> CheckpointInfo | None:
        path = self.directory / name
        return describe(path) if path.exists() else None

    def latest(self) -> CheckpointInfo | None:
        """latest.pt, or None if the directory holds no checkpoint yet."""
        return self._named(layout.LATEST)

    def best(self) -> CheckpointInfo | None:
        """best_model.pt, or None if no best has been saved."""
        return self._named(layout.BEST)

    def latest_step(self) -> int | None:
        """Newest committed step, or None if the directory holds no readable checkpoint."""
        steps = [i.step for i in self.all() if i.ok and i.step is not None]
        return max(steps) if steps else None

    def should_save(self, step: int) -> bool:
        """Whether `step` is a rolling save point."""
        every = self.options.save_every
        return every is not None and step > 0 and step % every == 0

    @property
    def best_value(self) -> float | None:
        """The best value of `options.metric` saved so far (survives restarts), or None."""
        return self._best_value

    def is_improvement(self, metrics: dict[str, float] | None) -> bool:
        """Whether these metrics would make a new best_model.pt."""
        value = (metrics or {}).get(self.options.metric)
        if value is None or math.isnan(value):
            return False
        if self._best_value is None:
            return True
        return value < self._best_value if self.options.mode == "min" else value > self._best_value

    def _read_best_value(self) -> float | None:
        for name in (layout.BEST, layout.BEST_BACKUP):
            info = self._named(name)
            if info is not None and info.ok:
                return info.metrics.get(self.options.metric)
        return None

    def protect(self, name: str) -> None:
        """Never delete `name` during this manager's life (the file being resumed from)."""
        self._protected.add(name)

    # ----------------------------------------------------------------------------- saving

    def save(self, state: dict[str, Any], *, step: int, epoch: int | None = None,
             kinds: Kind | Iterable[Kind] = Kind.ROLLING, metrics: dict[str, float] | None = None,
             meta: dict[str, Any] | None = None, verify: bool = True, shards: Shards | PendingShards | None = None,
             stall_before: float = 0.0) -> bool:
        """Save `state` as each of `kinds`; return whether a save was started.

        A BEST save happens only if `metrics` improve on the best so far. With `async_save` the call
        returns once the state is copied to staging buffers; `poll()` reports the outcome. `meta`
        (plain JSON) is stored in the footer, readable without loading the checkpoint.
        `verify=False` skips the read-back check (only for saves racing a deadline).
        `shards` (sharded state written by every rank with `sharded.ShardWriter`) makes each
        checkpoint a directory holding them and `state`; the store owns and removes `shards.directory`.
        `PendingShards` are still being written: the writer commits once they are durable.
        `stall_before`: seconds the caller was already blocked preparing this save (staging its
        shards), added to the recorded stall.
        """
        if self.read_only:
            raise CheckpointError("this checkpoint manager was opened read-only")
        started = time.perf_counter() - stall_before
        todo = [kinds] if isinstance(kinds, Kind) else list(dict.fromkeys(kinds))
        if Kind.BEST in todo and not self.is_improvement(metrics):
            todo.remove(Kind.BEST)
        if todo:
            self._wait_inflight()  # at most one save in flight: staging buffers are reused
        if not todo or not self._has_room(state, todo, step, shards):
            if isinstance(shards, PendingShards):
                self._writer().submit(self._discard, shards)  # still being written: delete it once done
            elif shards is not None:
                self._delete([shards.directory])
            return False
        if Kind.BEST in todo:
            self._best_value = (metrics or {})[self.options.metric]
        snapshot = self._stage(state) if self.options.async_save else state
        stall = time.perf_counter() - started
        self._inflight = self._writer().submit(self._commit, snapshot, step, epoch, todo, metrics, meta, stall,
                                               verify, shards)
        if not self.options.async_save:
            self._wait_inflight()
            for r in self._done:
                r.stall_s = time.perf_counter() - started  # synchronous: the caller waited for all of it
        return True

    def expected_save_seconds(self) -> float | None:
        """How long one more file like the last should take to commit, from measured saves; None before any."""
        if not self.write_bandwidth or not self._last_file_bytes:
            return None
        return self._last_file_bytes / self.write_bandwidth

    def _writer(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer",
                                                initializer=_yield_cpu_to_training)
        return self._executor

    def _stage(self, state: dict[str, Any]) -> dict[str, Any]:
        if self._staging is None:
            from .staging import StagingArea  # imports torch; the read-only paths never need it

            self._staging = StagingArea()
        return self._staging.stage(state)

    def poll(self) -> list[SaveResult]:
        """Results of saves finished since the last call; re-raises a writer bug (not a save failure)."""
        if self._inflight is not None and self._inflight.done():
            self._collect()
        done, self._done = self._done, []
        return done

    def wait_until_finished(self) -> list[SaveResult]:
        """Block until the save in flight has committed (or failed); return `poll()`."""
        self._wait_inflight()
        return self.poll()

    def _wait_inflight(self) -> None:
        # Short waits keep the main thread in Python, so signal handlers run promptly during long writes.
        while self._inflight is not None and not self._inflight.done():
            wait_futures([self._inflight], timeout=0.1)
        if self._inflight is not None:
            self._collect()

    def _collect(self) -> None:
        fut, self._inflight = self._inflight, None
        assert fut is not None
        results = fut.result()  # a bug in the writer surfaces here, loudly, with its traceback
        if any(r.kind is Kind.BEST and r.error for r in results):
            self._best_value = self._read_best_value()
        self._done.extend(results)
        self._jobs += 1
        if self.options.storage_report_every and self._jobs % self.options.storage_report_every == 0:
            logger.info("%s", self.storage_summary())

    def _commit(self, snapshot: dict[str, Any], step: int, epoch: int | None, kinds: Sequence[Kind],
                metrics: dict[str, float] | None, meta: dict[str, Any] | None, stall: float,
                verify: bool = True, shards: Shards | PendingShards | None = None) -> list[SaveResult]:
        began = time.perf_counter()
        try:
            if isinstance(shards, PendingShards):
                try:
                    shards = shards.wait()  # every rank's files are durable: part of this save's write_s
                except CheckpointError as e:
                    return [self._failed(kind, self._final_name(kind, step, epoch, datetime.now()), step, stall, e)
                            for kind in kinds]
            return self._commit_each(snapshot, step, epoch, kinds, metrics, meta, stall, verify, shards, began)
        finally:
            if shards is not None:
                self._delete([shards.directory])  # every checkpoint directory holds its own links to them

    def _discard(self, shards: PendingShards) -> None:
        try:
            shards.wait()
        except CheckpointError:
            pass  # a skipped save: its shards are deleted either way
        self._delete([shards.directory])

    def _failed(self, kind: Kind, name: str, step: int, stall: float, error: CheckpointError) -> SaveResult:
        logger.warning("checkpoint %s was not saved: %s; earlier checkpoints are intact", name, error)
        self._history({"event": "failed", "name": name, "kind": kind.value, "step": step, "error": str(error)})
        return SaveResult(kind, name, step, stall_s=stall, error=str(error))

    def _commit_each(self, snapshot: dict[str, Any], step: int, epoch: int | None, kinds: Sequence[Kind],
                     metrics: dict[str, float] | None, meta: dict[str, Any] | None, stall: float,
                     verify: bool, shards: Shards | None, began: float) -> list[SaveResult]:
        import torch

        results = []
        for kind in kinds:
            started = began if not results else time.perf_counter()
            now = datetime.now()
            name = self._final_name(kind, step, epoch, now)
            result = SaveResult(kind, name, step, stall_s=stall)
            saved_at = now.astimezone().isoformat(timespec="seconds")
            payload = dict(snapshot, checkpoint_type=kind.value, timestamp=saved_at,
                           format_version=fileformat.FORMAT_VERSION, torch_version=str(torch.__version__))
            footer = dict(meta or {}, name=name, kind=kind.value, step=step, epoch=epoch,
                          metrics=dict(metrics or {}), saved_at=saved_at, torch_version=str(torch.__version__))
            displaced: list[Path] = []  # files the renames replaced, deleted once this one is committed
            try:
                result.bytes = self._write_family(kind, self.directory / name, payload, footer, verify, shards,
                                                  displaced)
                self._point_latest_to(self.directory / name, step, displaced)
            except CheckpointError as e:
                self._delete(displaced)
                results.append(self._failed(kind, name, step, stall, e))
                continue
            result.write_s = time.perf_counter() - started  # committed: durable, verified, latest points here
            deleted = self._prune(kind)
            self._delete(displaced)
            result.cleanup_s = time.perf_counter() - started - result.write_s
            self._last_file_bytes = fileformat.checkpoint_size(self.directory / name)
            self.write_bandwidth = result.bytes / max(result.write_s, 1e-9)
            self._history({"event": "save", "name": name, "kind": kind.value, "step": step, "epoch": epoch,
                           "bytes": result.bytes, "stall_s": stall, "write_s": result.write_s,
                           "cleanup_s": result.cleanup_s, "metrics": dict(metrics or {}), "saved_at": saved_at})
            for gone in deleted:
                self._history({"event": "delete", "name": gone, "kind": kind.value, "step": step})
            results.append(result)
        return results

    def _delete(self, temporaries: list[Path]) -> None:
        """Remove files or directories under temporary names (displaced checkpoints, used shards)."""
        for path in temporaries:
            try:
                storage.remove(path)
            except OSError as e:  # a leftover temporary name: the next writing open removes it
                logger.warning("could not remove %s: %s", path.name, e)

    def _final_name(self, kind: Kind, step: int, epoch: int | None, now: datetime) -> str:
        if kind is Kind.ROLLING:
            return layout.rolling_name(step)
        if kind is Kind.EMERGENCY:
            return layout.emergency_name(step, now)
        if kind is Kind.EPOCH:
            if epoch is None:
                raise ValueError("an epoch checkpoint needs epoch=")
            return layout.epoch_name(epoch)
        return layout.BEST

    def _write_family(self, kind: Kind, path: Path, payload: dict[str, Any], footer: dict[str, Any],
                      verify: bool, shards: Shards | None, displaced: list[Path]) -> int:
        """Write one checkpoint plus its family's backup; return the bytes it holds (shards included)."""
        d = self.directory

        def keep_old_best() -> None:  # only once the new best is durable and verified
            if path.exists():
                storage.link_checkpoint(path, d / layout.BEST_PREVIOUS, displaced)

        backups = {Kind.ROLLING: [d / layout.ROLLING_BACKUP], Kind.BEST: [d / layout.BEST_BACKUP]}.get(kind, [])
        storage.write_checkpoint(path, payload, footer, before_commit=keep_old_best if kind is Kind.BEST else None,
                                 verify=verify, copies=backups, shards=shards, displaced=displaced)
        return (1 + len(backups)) * fileformat.checkpoint_size(path)

    def _point_latest_to(self, path: Path, step: int, displaced: list[Path]) -> None:
        latest = self.directory / layout.LATEST
        current = self._named(layout.LATEST)
        # latest_backup.pt keeps the previous *step*: a second save at the same step (best and rolling
        # together) re-points latest only. A damaged latest is replaced, never rotated over the backup.
        if current is not None and current.ok and current.step != step:
            storage.link_checkpoint(latest, self.directory / layout.LATEST_BACKUP, displaced)
        storage.link_checkpoint(path, latest, displaced)

    def _prune(self, kind: Kind) -> list[str]:
        keep = {Kind.ROLLING: self.options.keep_rolling, Kind.EMERGENCY: self.options.keep_emergency}.get(kind)
        if keep is None:
            return []  # best and epoch files are never rotated
        family = Family.ROLLING if kind is Kind.ROLLING else Family.EMERGENCY
        files = []
        for p in self.directory.iterdir():
            parsed = layout.parse_name(p.name)
            if parsed and parsed.family is family and parsed.step is not None:
                files.append((parsed.step, parsed.saved or datetime.min, p))
        files.sort()
        doomed = to_delete(files, keep_last(keep), protected=lambda f: f[2].name in self._protected)
        for _, _, p in doomed:
            storage.remove(p)
        return [p.name for _, _, p in doomed]

    def _history(self, record: dict[str, Any]) -> None:
        record["time"] = time.time()
        try:
            storage.append_line(self.directory / layout.HISTORY, record)
        except OSError as e:
            logger.warning("could not append to %s: %s", layout.HISTORY, e)

    # ----------------------------------------------------------------------------- disk space

    def _has_room(self, state: dict[str, Any], kinds: Sequence[Kind], step: int,
                  shards: Shards | PendingShards | None) -> bool:
        copies = sum(2 if k in (Kind.ROLLING, Kind.BEST) else 1 for k in kinds)
        # The last file written, else this state's tensors plus framing (and its shards).
        shard_bytes = shards.bytes if isinstance(shards, Shards) else shards.expected_bytes if shards else 0
        per_file = self._last_file_bytes or tensor_bytes(state) + (1 << 16) + shard_bytes
        needed = copies * per_file + self.options.min_free_bytes
        free = storage.free_bytes(self.directory)
        if free >= needed:
            return True
        storage.clean_temp_files(self.directory)
        for kind in (Kind.ROLLING, Kind.EMERGENCY):
            for gone in self._prune(kind):
                self._history({"event": "delete", "name": gone, "kind": kind.value, "step": step})
        free = storage.free_bytes(self.directory)
        if free >= needed:
            return True
        names = ", ".join(k.value for k in kinds)
        msg = (f"not enough free space in {self.directory}: {human_bytes(free)} free, a {names} save at step {step} "
               f"needs {human_bytes(copies * per_file)} plus --min-free-space {human_bytes(self.options.min_free_bytes)}; "
               "skipping this save (earlier checkpoints are intact)")
        logger.warning("%s", msg)
        self._history({"event": "skipped", "step": step, "kinds": [k.value for k in kinds], "free": free})
        self._done.extend(SaveResult(k, "", step, error=msg, skipped=True) for k in kinds)
        return False

    def storage_summary(self) -> str:
        """One line: storage used per family (hard links counted once), total, and free space."""
        usage = self.usage_by_family()
        parts = ", ".join(f"{fam.value} {human_bytes(b)}" for fam, b in usage.items() if b)
        total = human_bytes(sum(usage.values()))
        return f"checkpoint storage: {parts or 'empty'}; total {total}; free {human_bytes(storage.free_bytes(self.directory))}"

    def usage_by_family(self) -> dict[Family, int]:
        """Bytes on disk per family, each file counted once however many names it has."""
        return disk_usage(self.all())

    # ----------------------------------------------------------------------------- restoring

    def resolve(self, which: str | Path) -> Path:
        """Where `which` points: a bare name resolves inside the directory, a path-like one is taken as given."""
        return fallback.resolve(self.directory, which)

    def candidates(self, which: str | Path) -> list[Path]:
        """Files to try, in order, for `which` = "latest", "best", a name or a path (see SPEC §5)."""
        return fallback.candidates(self.directory, which, self.all() if which == "latest" else [])

    def restore(self, which: str | Path = "latest", map_location: Any = "cpu") -> tuple[dict[str, Any], CheckpointInfo]:
        """Load a verified state; fall back loudly along the chain of SPEC §5. Returns (state, info).

        Raises NoCheckpointError if there is nothing to restore and CheckpointError if every
        candidate fails verification.
        """
        state, path, footer = fallback.load_first_valid(self.candidates(which), self.directory, map_location)
        if path.parent == self.directory:
            self.protect(path.name)  # retention must never delete the file this run resumed from
        found = describe(path)
        return state, CheckpointInfo(path.name, path, found.family, found.size, found.inode, footer)


def _yield_cpu_to_training() -> None:
    """Lower the writer thread's CPU priority: where cores are few, training should win them."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)  # Linux: this thread only
    except (AttributeError, OSError):
        pass  # not Linux, or not permitted: the writer just runs at normal priority

