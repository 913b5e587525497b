"""CheckpointManager: the policy layer of the store (layout, retention, best tracking, fallback).

    with CheckpointManager("checkpoints", CheckpointOptions(keep_rolling=3)) as ckpt:
        if ckpt.latest() is not None:
            state, info = ckpt.restore("latest")
        for step in range(start, end + 1):
            ...
            if ckpt.should_save(step):
                ckpt.save(my_state(), step=step, kinds=Kind.ROLLING)

It knows nothing about models: a state is a dict of plain data and tensors. Bytes go through
`storage`; this module decides names, order, and what may be deleted. `save()` checks everything
it is given in the caller's thread (see `validation`), so a mistake raises where it is made.

Commit order of one save (each line is durable before the next starts):
  0. with shards still being written by every rank (PendingShards), wait until all are durable;
  1. the new file and its independent backup (rolling and best) are written in one serialization
     pass under temporary names, fsynced, read back and verified; then the file is renamed (and
     the directory fsynced): **the save is committed**; then the backup is renamed. For a best,
     the old best_model.pt was first linked under a temporary name, which only now becomes
     best_model_previous.pt, so a failed best save changes nothing;
  2. latest_backup.pt becomes the old latest (a hard link, when it is on this run's line of
     training), then latest.pt the new file (`write_s` ends). A kill between 1 and 2 leaves a
     committed file newer than latest.pt: `restore("latest")` takes the newest on the line;
  3. retention deletes what its family's policy drops, never a protected or foreign file, and the
     files the renames replaced (kept under temporary names until now) are deleted (`cleanup_s`);
  4. one line is appended to history.jsonl.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from datetime import datetime
from pathlib import Path
from typing import Any

from . import commit, fallback, fileformat, layout, space, storage
from .best import BestTracker
from .fileformat import CheckpointError
from .inventory import Retention
from .layout import Family, Kind
from .lineage import Line, new_run_id
from .lock import DirectoryLock
from .mirror import Mirror
from .records import (
    CheckpointInfo,
    CheckpointOptions,
    NoCheckpointError,
    SaveResult,
    describe,
    disk_usage,
    human_bytes,
    scan,
    tensor_bytes,
    tensors_in,
)
from .remote import RemoteStore, mask
from .storage import PendingShards, Shards
from .validation import as_number, check_meta, check_plain_data, clean_metrics

logger = logging.getLogger("train_improved.checkpoint")


class CheckpointManager:
    """Saves, rotates and restores the checkpoints of one directory. See the module docstring.

    A writing manager holds an exclusive lock on the directory for its lifetime; pass
    `read_only=True` to inspect or restore without it (the lister, tools, non-zero ranks). A
    read-only manager on a directory that does not exist yet sees no checkpoints.

    With `options.mirror`, the URL is checked when the manager opens (MirrorError, one line), a
    writing manager's `restore()` falls back to the mirror, and its first `save()` starts the
    uploader, which takes the prefix over from any older writer (see `mirror`).
    """

    def __init__(self, directory: str | Path, options: CheckpointOptions | None = None,
                 *, read_only: bool = False) -> None:
        self.directory = Path(directory)
        self._options = options or CheckpointOptions()
        self.read_only = read_only
        self._protected: set[str] = set()
        self._live: set[Path] = set()  # staging directories handed out whose save is not finished
        self._lock: DirectoryLock | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: Future[list[SaveResult]] | None = None
        # Held while one save commits all its kinds (rolling, then epoch, then best): the mirror lists the
        # directory only between saves, so "mirrored up to step N" includes every file of step N.
        self._committing = threading.Lock()
        self._done: list[SaveResult] = []
        self._jobs = 0
        self._last_file_bytes: int | None = None
        self.write_bandwidth: float | None = None  # bytes/s of the last committed save, all work included
        self._staging: Any = None
        self._line = Line(new_run_id())  # this run's line of training; a restore continues another's
        self._parent_path: Path | None = None  # the checkpoint restored from (recorded in every footer)
        self._resumed: dict[str, Any] | None = None  # its footer, which seeds best tracking
        self._best = BestTracker(self._options.metric, self._options.mode)  # the store's one best tracker
        self.remote: RemoteStore | None = None  # the second tier, from options.mirror
        self.mirror: Mirror | None = None  # its background uploader, started by a writing manager's first save
        self._mirror_events: deque[dict[str, Any]] = deque()  # appended by the uploader's thread
        if self._options.mirror:  # checked before anything is written: MirrorError in one line if unusable
            self.remote = RemoteStore.open(self._options.mirror, self._options.mirror_options,
                                           check_writable=not read_only)
        if not read_only:
            self._open_for_writing()
        self._seed_best()

    # ----------------------------------------------------------------------------- lifecycle

    def _open_for_writing(self) -> None:
        self._lock = DirectoryLock(self.directory)
        if removed := storage.clean_temp_files(self.directory):
            logger.warning("removed %d temporary file(s) left by an interrupted save in %s", len(removed),
                           self.directory)

    def close(self, mirror_wait: float = 300.0) -> list[SaveResult]:
        """Wait for the save in flight (and for the mirror, up to `mirror_wait` seconds), release the
        directory, and return the results not yet polled."""
        if self._executor is not None:
            self._wait_inflight()
            self._executor.shutdown(wait=True)
            self._executor = None
        lock, self._lock = self._lock, None
        if self.mirror is not None:
            if not self.mirror.close(wait=mirror_wait) and self.mirror.stopped is None:
                logger.warning("the mirror did not catch up before the end: it holds up to step %s",
                               self.mirror.mirrored_step)
            if lock is not None:  # an upload still finishing keeps the directory: no second uploader meanwhile
                self.mirror.when_stopped(lock.release)
                lock = None
            self.mirror = None
        if lock is not None:
            lock.release()
        return self.poll()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def options(self) -> CheckpointOptions:
        return self._options

    @options.setter
    def options(self, options: CheckpointOptions) -> None:
        """New options apply from the next save; a changed metric or mode re-seeds best tracking; a mirror
        given now is opened now (the mirror of a manager cannot change: open a new manager)."""
        if self._options.mirror and options.mirror != self._options.mirror:
            raise ValueError(f"this manager mirrors to {self._options.mirror}: its mirror cannot change")
        mirror_now = options.mirror and not self._options.mirror
        self._options = options
        if mirror_now:
            self.remote = RemoteStore.open(options.mirror, options.mirror_options, check_writable=not self.read_only)
        self._seed_best()
        if self.mirror is not None:
            self.mirror.retention = Retention.of(options)

    # ----------------------------------------------------------------------------- queries

    def all(self) -> list[CheckpointInfo]:
        """Every checkpoint file of the directory (valid or not), oldest step first. Reads footers only."""
        return scan(self.directory)

    def _named(self, name: str) -> CheckpointInfo | None:
        try:
            return describe(self.directory / name)
        except FileNotFoundError:
            return None

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

    def on_current_line(self, info: CheckpointInfo) -> bool:
        """Whether a checkpoint belongs to the line of training this manager continues (see `lineage`)."""
        return self._line.holds(info.meta)

    @property
    def run_id(self) -> str:
        """This manager's run, recorded in every footer it writes (`lineage`)."""
        return self._line.run

    # ----------------------------------------------------------------------------- best tracking

    @property
    def best_value(self) -> float | None:
        """The best committed value of `options.metric` on this line of training, or None."""
        return self._best.best[0] if self._best.best else None

    def is_improvement(self, metrics: dict[str, Any] | None) -> bool:
        """Whether these metrics would make a new best_model.pt (False if `options.metric` is missing or NaN)."""
        return self._best.is_improvement(metrics)

    def enters_top(self, metrics: dict[str, Any] | None) -> bool:
        """Whether these metrics rank among the `keep_best` best kept (best_step_*.pt); False without keep_best."""
        value = as_number((metrics or {}).get(self.options.metric))
        if not self.options.keep_best or value is None or not math.isfinite(value):
            return False
        kept = sorted((v for v, _, _ in commit.top_values(self.directory, self.options.metric) if v is not None),
                      reverse=self.options.mode == "max")
        if len(kept) < self.options.keep_best:
            return True
        worst = kept[self.options.keep_best - 1]
        return value < worst if self.options.mode == "min" else value > worst

    def _seed_best(self) -> None:
        self._best = BestTracker(self.options.metric, self.options.mode)
        best_files = [i.meta for i in (self._named(layout.BEST), self._named(layout.BEST_BACKUP)) if i and i.ok]
        self._best.seed(self._resumed, best_files, announce=not self.read_only)  # a reader tracks nothing

    def protect(self, name: str) -> None:
        """Never delete `name` during this manager's life (the file being resumed from)."""
        self._protected.add(name)

    # ----------------------------------------------------------------------------- saving

    def staging_directory(self) -> Path:
        """A fresh temporary name in the directory for sharded state (`sharded.ShardWriter.start`).

        It stays live, so a cleanup never deletes it, until the save given its shards is finished.
        """
        path = storage.temp_path_for(self.directory / "shards")
        self._live.add(path)
        return path

    def save(self, state: dict[str, Any], *, step: int, epoch: int | None = None,
             kinds: Kind | Iterable[Kind] = Kind.ROLLING, metrics: dict[str, Any] | None = None,
             meta: dict[str, Any] | None = None, args: dict[str, Any] | None = None, verify: bool = True,
             shards: Shards | PendingShards | None = None, stall_before: float = 0.0) -> bool:
        """Save `state` as each of `kinds`; return whether a save was started.

        Raises at once, before anything is written: TypeError if `state` holds anything that
        `torch.load(weights_only=True)` cannot load back, naming its key; ValueError for a metric
        that is not a finite number, a reserved `meta` key, a footer over 64 KiB, an EPOCH save
        without `epoch`, or a BEST save without `metrics[options.metric]`.
        A BEST save happens only if `metrics` improve on the best so far, a TOP save (best_step_*.pt)
        only if they rank among the `keep_best` best kept (the worst is then deleted); a save is skipped (and
        reported by `poll()`) when the disk lacks room. With `async_save` the call returns once the
        state is copied to staging buffers; `poll()` reports the outcome. `meta` (plain JSON) is
        stored in the footer, readable without loading the checkpoint; `args` are the options of
        the `train` command, which its tools read back (leave it out in your own loop).
        `verify=False` skips the read-back check (only for saves racing a deadline).
        `shards` (sharded state written by every rank with `sharded.ShardWriter` into
        `staging_directory()`) makes each checkpoint a directory holding them and `state`; the store
        owns and removes `shards.directory`. `PendingShards` are still being written: the writer
        commits once they are durable. `stall_before`: seconds the caller was already blocked
        preparing this save (staging its shards), added to the recorded stall.
        """
        return self._save(state, step=step, epoch=epoch, kinds=kinds, metrics=metrics, meta=meta, args=args,
                          verify=verify, shards=shards, stall_before=stall_before, stage=self.options.async_save)

    def _save(self, state: dict[str, Any], *, step: int, stage: bool, epoch: int | None = None,
              kinds: Kind | Iterable[Kind] = Kind.ROLLING, metrics: dict[str, Any] | None = None,
              meta: dict[str, Any] | None = None, args: dict[str, Any] | None = None, verify: bool = True,
              shards: Shards | PendingShards | None = None, stall_before: float = 0.0) -> bool:
        """`save()`; `stage`: copy the state into the staging buffers first (else the writer reads it in place)."""
        if self.read_only:
            raise CheckpointError("this checkpoint manager was opened read-only")
        started = time.perf_counter() - stall_before
        todo = [kinds] if isinstance(kinds, Kind) else list(dict.fromkeys(kinds))
        check_meta(meta)
        footer_meta = dict(meta or {}, **({"args": args} if args is not None else {}))
        metrics = self._check(state, step, epoch, todo, metrics, footer_meta)
        if self.remote is not None and self.mirror is None:
            self.attach_mirror(self.remote)  # the first save takes the mirror's prefix (one writer per prefix)
        if todo:
            self._wait_inflight()  # at most one save in flight: staging buffers are reused
        if Kind.BEST in todo and not self.is_improvement(metrics):
            todo.remove(Kind.BEST)
        if Kind.TOP in todo and not self.enters_top(metrics):
            todo.remove(Kind.TOP)
        without_copy: frozenset[Kind] = frozenset()
        if todo:
            todo, without_copy = self._room_for(state, todo, step, shards)
        if not todo:
            if isinstance(shards, PendingShards):
                self._writer().submit(commit.discard, self._context(), shards)  # delete it once written
            elif shards is not None:
                commit.delete(self._context(), [shards.directory])
            return False
        if Kind.BEST in todo:
            self._best.propose(metrics[self.options.metric], step)
        snapshot = self._stage(state) if stage else state
        stall = time.perf_counter() - started
        self._inflight = self._writer().submit(self._commit_whole, self._context(without_copy), snapshot, step, epoch,
                                               todo, metrics, footer_meta, stall, verify, shards)
        if not self.options.async_save:
            self._wait_inflight()
            for r in self._done:
                r.stall_s = time.perf_counter() - started  # synchronous: the caller waited for all of it
        return True

    def _check(self, state: dict[str, Any], step: int, epoch: int | None, kinds: list[Kind],
               metrics: dict[str, Any] | None, footer_meta: dict[str, Any]) -> dict[str, float]:
        check_plain_data(state, self.options.safe_globals)
        clean = clean_metrics(metrics)
        if Kind.EPOCH in kinds and epoch is None:
            raise ValueError("an EPOCH save needs epoch= (which epoch just ended)")
        if (Kind.BEST in kinds or Kind.TOP in kinds) and self.options.metric not in clean:
            raise ValueError(f"a BEST or TOP save needs metrics[{self.options.metric!r}] (options.metric); "
                             f"got {sorted(clean) or 'no metrics'}")
        probe = commit.footer(self._context(), Kind.EMERGENCY, layout.emergency_name(step, datetime.now()), step,
                              epoch, clean, footer_meta, "", self._best.best)
        fileformat.encode_footer(dict(probe, format_version=fileformat.FORMAT_VERSION, digest="0" * 32,
                                      algorithm=fileformat.DIGEST_ALGORITHM, payload_bytes=1 << 62))
        return clean

    def emergency_save(self, state: dict[str, Any], *, step: int, budget: float | None = None,
                       since: float | None = None, **save_options: Any) -> list[SaveResult]:
        """Save `state` as an EMERGENCY checkpoint now and wait for it; return every result finished.

        For a stop request (see `GracefulStop`): the save in flight is finished first, so commits
        stay in order. `budget`: seconds until the process is killed (SIGTERM's grace), counted from
        `since` (a `time.monotonic()` value: `GracefulStop.at`, when the signal arrived; default now).
        A save expected to take longer than what is left skips its read-back check (its digest is
        still checked on load); the mirror's upload is awaited only within what is left after it.
        A state whose tensors all lie in host memory is written from where it lies, not copied into
        the staging buffers first: the caller waits for the save anyway (and the first save of a run
        would also allocate them). Tensors on a GPU are still staged, by DMA into pinned buffers.
        `save_options` are `save()`'s (epoch, metrics, meta, args, shards, stall_before).
        """
        deadline = None if budget is None else (since if since is not None else time.monotonic()) + budget
        self._wait_inflight()
        verify = True
        expected = self.expected_save_seconds()
        if deadline is not None and expected is not None and expected > deadline - time.monotonic():
            verify = False
            logger.warning("an emergency save is expected to take %.1fs, over the %.1fs left of the budget of %.0fs: "
                           "skipping its read-back verification (its checksum is still checked on load)", expected,
                           max(0.0, deadline - time.monotonic()), budget)
        on_device = any(t.device.type != "cpu" for t in tensors_in(state))
        self._save(state, step=step, kinds=Kind.EMERGENCY, verify=verify, stage=self.options.async_save and on_device,
                   **save_options)
        results = self.wait_until_finished()
        if self.mirror is not None:  # the one save the loop waits for on the mirror, within what is left
            left = max(0.0, deadline - time.monotonic()) if deadline is not None else 60.0
            if not self.mirror.request(wait=left) and self.mirror.stopped is None:
                logger.warning("the emergency checkpoint did not reach the mirror within the budget; the mirror "
                               "holds up to step %s", self.mirror.mirrored_step)
        return results

    def attach_mirror(self, remote: RemoteStore) -> None:
        """Mirror every committed save to `remote` (a `remote.RemoteStore`) from a background uploader.

        `CheckpointOptions(mirror=URL)` does this when the manager opens; this is for a store you opened.
        """
        self.remote = remote

        self.mirror = Mirror(remote, self.directory, on_sync=self._mirror_events.append, run_id=self.run_id,
                             retention=Retention.of(self.options), between_saves=self._committing)
        self.mirror.request()  # what the store already holds goes up first

    def open_mirror(self, wait: float) -> bool:
        """Take the mirror's prefix now rather than at the first save, and wait up to `wait` s for its first sync.

        For nodes that upload shard files themselves: the mirror's start-up sweep of unlisted objects
        must be over before they upload. Returns whether the sync finished; False without a mirror.
        """
        if self.remote is None or self.read_only:
            return False
        if self.mirror is None:
            self.attach_mirror(self.remote)
        assert self.mirror is not None
        return self.mirror.request(wait=wait)

    def mirror_events(self) -> list[dict[str, Any]]:
        """Syncs the mirror finished since the last call (mirrored_step, upload_s, upload_bytes)."""
        events = []
        while self._mirror_events:
            events.append(self._mirror_events.popleft())
        return events

    def expected_save_seconds(self) -> float | None:
        """How long one more file like the last should take to commit, from measured saves; None before any."""
        if not self.write_bandwidth or not self._last_file_bytes:
            return None
        return self._last_file_bytes / self.write_bandwidth

    def _context(self, without_copy: frozenset[Kind] = frozenset()) -> commit.SaveContext:
        """What the writer thread needs to commit a save, fixed now (`without_copy`: kinds the disk has no room
        to copy)."""
        parent = None
        if self._resumed is not None and self._parent_path is not None:
            resumed_line = Line.of(self._resumed)
            parent = {"run": resumed_line.run if resumed_line else None, "step": self._resumed.get("step"),
                      "name": self._resumed.get("name", self._parent_path.name)}
        return commit.SaveContext(self.directory, self.options, self._line, parent, self._parent_path,
                                  frozenset(self._protected), self._best, self._live.discard, without_copy)

    def _commit_whole(self, *args: Any) -> list[SaveResult]:
        with self._committing:
            return commit.commit(*args)

    def _writer(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer",
                                                initializer=storage.yield_cpu_to_training)
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
        for r in results:
            if r.kind is Kind.BEST:  # the tracker moves only once the new best is committed
                self._best.settle(committed=r.error is None)
            if r.error is None and r.write_s:  # what the next save should cost (expected_save_seconds)
                self._last_file_bytes, self.write_bandwidth = r.file_bytes, r.bytes / max(r.write_s, 1e-9)
        self._done.extend(results)
        self._jobs += 1
        if self.mirror is not None and any(r.error is None for r in results):
            self.mirror.request()  # never waits: the uploader coalesces what it has not sent yet
        if self.options.storage_report_every and self._jobs % self.options.storage_report_every == 0:
            logger.info("%s", self.storage_summary())

    # ----------------------------------------------------------------------------- disk space

    def _room_for(self, state: dict[str, Any], kinds: list[Kind], step: int,
                  shards: Shards | PendingShards | None) -> tuple[list[Kind], frozenset[Kind]]:
        """The kinds whose files fit on the disk, and those of them saved without their copy (see `space`).

        When the plan falls short, temporary files and what retention allows are removed; if a file
        still does not fit, the oldest rolling checkpoints beyond the newest two too. Each step is said.
        """
        # The last file written, else this state's tensors plus framing (and its shards).
        shard_bytes = shards.bytes if isinstance(shards, Shards) else shards.expected_bytes if shards else 0
        per_file = self._last_file_bytes or tensor_bytes(state) + (1 << 16) + shard_bytes

        def plan() -> tuple[list[Kind], list[Kind]]:
            return space.fit(kinds, per_file, storage.free_bytes(self.directory) - self.options.min_free_bytes)

        files, copies = plan()
        if not space.complete(kinds, files, copies):
            storage.clean_temp_files(self.directory, keep=self._live)
            for kind in (Kind.ROLLING, Kind.EMERGENCY):
                for gone in commit.prune(self._context(), kind, step):
                    commit.history(self.directory, {"event": "delete", "name": gone, "kind": kind.value, "step": step})
            files, copies = plan()
        if len(files) < len(kinds):  # the newest state matters most: older rolling files make room for it
            for gone in commit.prune(self._context(), Kind.ROLLING, step, keep=space.LOW_DISK_ROLLING):
                logger.warning("low on disk space: deleted %s to make room for the save at step %d (the newest %d "
                               "rolling checkpoints are kept)", gone, step, space.LOW_DISK_ROLLING)
                commit.history(self.directory, {"event": "delete", "name": gone, "kind": "rolling", "step": step,
                                                "reason": "low disk space"})
            files, copies = plan()
        free = storage.free_bytes(self.directory)
        for k in kinds:
            if k in files:
                if k in space.WITH_COPY and k not in copies:
                    copy = layout.ROLLING_BACKUP if k is Kind.ROLLING else layout.BEST_BACKUP
                    logger.warning("not enough free space in %s for %s, the independent copy of the %s save at step "
                                   "%d (%s free, --min-free-space %s): the checkpoint is written without it",
                                   self.directory, copy, k.value, step, human_bytes(free),
                                   human_bytes(self.options.min_free_bytes))
                continue
            msg = (f"not enough free space in {self.directory}: {human_bytes(free)} free, a {k.value} save at "
                   f"step {step} needs {human_bytes(per_file)} plus --min-free-space "
                   f"{human_bytes(self.options.min_free_bytes)}; skipping this save (earlier checkpoints are intact)")
            logger.warning("%s", msg)
            commit.history(self.directory, {"event": "skipped", "step": step, "kinds": [k.value], "free": free})
            self._done.append(SaveResult(k, "", step, error=msg, skipped=True))
        return [k for k in kinds if k in files], frozenset(k for k in files if k in space.WITH_COPY and k not in copies)

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
        return [c.path for c in fallback.candidates(self.directory, which, self.all() if which == "latest" else [])]

    def restore(self, which: str | Path = "latest", map_location: Any = "cpu",
                safe_globals: Sequence[Any] = ()) -> tuple[dict[str, Any], CheckpointInfo]:
        """Load a verified state; fall back loudly along the chain of SPEC §5. Returns (state, info).

        "latest" is the newest valid checkpoint on the current line of training. With a mirror
        (`options.mirror`), a writing manager whose local chain has nothing valid (a new machine)
        continues on the mirror's chain: downloaded, verified, kept in the directory under its own
        name (never one the next save replaces), said in a warning. `map_location` is
        torch.load's. `safe_globals`: classes you saved deliberately, allowed on top of plain data
        and `options.safe_globals`. Raises NoCheckpointError if there is nothing to restore and
        CheckpointError if every candidate fails verification. A writing manager records each
        failed verification in history.jsonl (the lister shows it) and continues the restored
        checkpoint's line of training: its best so far, and latest_backup.pt.
        """
        try:
            return self._restore_local(which, map_location, safe_globals)
        except CheckpointError as e:
            if self.remote is None or self.read_only or layout.is_explicit_path(str(which)):
                raise
            logger.warning("%s: trying the mirror %s", "the local store holds no checkpoint"
                           if isinstance(e, NoCheckpointError) else "no valid checkpoint in the local store",
                           mask(self.remote.url))
        return self._restore_local(self.remote.fetch(str(which), self.directory), map_location, safe_globals)

    def _restore_local(self, which: str | Path, map_location: Any, safe_globals: Sequence[Any]
                       ) -> tuple[dict[str, Any], CheckpointInfo]:
        if not self.directory.is_dir():
            raise NoCheckpointError(f"checkpoint directory {self.directory} does not exist")
        chain = fallback.candidates(self.directory, which, self.all() if which == "latest" else [])
        state, path, footer = fallback.load_first_valid(
            chain, self.directory, map_location, on_failure=None if self.read_only else self._record_failure,
            safe_globals=[*self.options.safe_globals, *safe_globals],
            prepare=self._fetch_shards_on_mirror if self.remote is not None and not self.read_only else None)
        if path.parent == self.directory:
            self.protect(path.name)  # retention must never delete the file this run resumed from
        line = Line.of(footer)
        step = footer.get("step")
        if line is not None and isinstance(step, int):
            self._line = line.continued_by(self._line.run, step)
        self._parent_path, self._resumed = path, footer
        self._seed_best()
        found = describe(path)
        return state, CheckpointInfo(path.name, path, found.family, found.size, found.inode, footer)

    def _fetch_shards_on_mirror(self, path: Path) -> None:
        # Nodes with disks of their own upload the shard files they write; this disk holds only its node's.
        if path.is_dir() and self.remote is not None:
            self.remote.complete_shards(path)

    def _record_failure(self, path: Path, reason: str) -> None:
        try:
            digest = fileformat.read_footer(path).get("digest")
        except CheckpointError:
            digest = None
        commit.history(self.directory, {"event": "verify_failed", "name": path.name, "digest": digest,
                                        "error": reason})
