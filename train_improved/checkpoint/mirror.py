"""The background uploader of the second tier: the local store, mirrored by a RemoteStore.

    remote = RemoteStore.open("s3://bucket/run1", {"endpoint_url": ...})
    mirror = Mirror(remote, Path("checkpoints"), run_id="9f2c1a7e")   # starts its thread; no I/O in the caller
    mirror.request()                    # after each committed local save; never blocks
    mirror.request(wait=20.0)           # an emergency: wait for it, within a budget

Its thread first opens the prefix: it reads the manifest, claims it with a conditional write that
names this writer (the newest run to open a prefix owns it; an older one is fenced off at its
next manifest write), then removes what no manifest lists. Each sync then uploads what the local
store holds and the mirror does not (each distinct file once, verified: see remote.py), writes the
manifest that `inventory.plan_manifest` decides from both tiers, and only then deletes the
objects it no longer lists. Every step of that runs inside the retry loop: a mirror outage
never stops training.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from . import fileformat, layout, storage
from .inventory import Entry, ObjectRef, Retention, keys, plan_manifest
from .lineage import new_run_id
from .records import CheckpointInfo, scan
from .remote import MirrorError, MirrorFenced, RemoteStore, mask, one_line

logger = logging.getLogger("train_improved.checkpoint")
# Upload order when the mirror lags: what a resume needs first. Rolling files are skipped while a
# newer request waits (coalescing); the newest state always goes up first.
_PRIORITY = {layout.LATEST: 0, layout.BEST: 2, layout.BEST_PREVIOUS: 3}
RETRY_FIRST_S, RETRY_MAX_S = 1.0, 30.0  # backoff between failed syncs; requests never shorten it


class Mirror:
    """The background uploader: keeps the remote inventory up to date with the local store, newest state first.

    It runs in its own thread, apart from the save writer, so it never delays a local commit. A
    request made while an upload runs is coalesced: intermediate rolling files are skipped and
    the newest state goes up next. Failures are warned about once, then retried with backoff.
    `retention` is the local families' (keep_rolling, keep_emergency, keep_best, metric, mode),
    applied to both tiers together. `between_saves`, a lock the store holds while a save commits
    its kinds, is taken to list the directory: a sync never sees half of a save.
    """

    def __init__(self, remote: RemoteStore, directory: Path, on_sync: Callable[[dict[str, Any]], None] | None = None,
                 *, run_id: str | None = None, retention: Retention | None = None,
                 between_saves: threading.Lock | None = None) -> None:
        self.remote, self.directory = remote, directory
        self.between_saves = between_saves or threading.Lock()
        self.on_sync = on_sync or (lambda record: None)
        self.retention = retention or Retention()
        # Who writes the prefix, as the manifest names it: what a fenced-off older run reads in its error.
        self.writer = {"run": run_id or new_run_id(), "host": socket.gethostname(), "pid": os.getpid(),
                       "since": datetime.now().astimezone().isoformat(timespec="seconds")}
        self.uploaded_bytes = 0
        self.mirrored_step: int | None = None
        self.stopped: str | None = None  # why the mirror gave up for good (fenced off, a newer format)
        self._cond = threading.Condition()
        self._requested = 0  # generation of the newest request
        self._done = 0  # generation the last finished sync started from
        self._closing = False
        self._failing = False
        self._entries: dict[str, Entry] | None = None  # the manifest as this writer last wrote it; None: not open
        self._token: str | None = None
        self._damaged: set[str] = set()  # digests of local files that failed their check: never sent
        self._when_stopped: list[Callable[[], None]] = []
        self._thread = threading.Thread(target=self._run, name="checkpoint-mirror", daemon=True)
        self._thread.start()

    def request(self, wait: float | None = None) -> bool:
        """Ask for a sync of the local store; with `wait`, block up to that many seconds for it to finish.

        Returns whether the mirror holds everything the local store held at the time of the request
        (a local file that fails its own checksum excepted: it is never uploaded, and said so).
        """
        with self._cond:
            self._requested += 1
            mine = self._requested
            self._cond.notify_all()
            if wait is None:
                return False
            deadline = time.monotonic() + wait
            while self._done < mine and self.stopped is None and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            return self._done >= mine

    def close(self, wait: float) -> bool:
        """Finish the last request within `wait` seconds, then stop the thread; whether it caught up.

        A sync still running after that stops before its next file; see `when_stopped`.
        """
        if wait > 0:
            done = self.request(wait=wait)
        else:
            with self._cond:
                done = self._done >= self._requested
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout=1.0)
        return done

    def when_stopped(self, callback: Callable[[], None]) -> None:
        """Run `callback` once the uploader's thread has ended: now, or when it ends (the manager keeps
        its directory lock until then, so no second uploader can start on the same store)."""
        with self._cond:
            if self._thread.is_alive():
                self._when_stopped.append(callback)
                return
        callback()

    def lag(self, local_step: int | None) -> int | None:
        if local_step is None:
            return None
        return local_step - (self.mirrored_step or 0)

    # ----------------------------------------------------------------------------- the thread

    def _run(self) -> None:
        storage.yield_cpu_to_training()
        self.remote.yield_cpu_to_training()
        try:
            self._loop()
        finally:
            with self._cond:
                self._closing = True
                callbacks, self._when_stopped = self._when_stopped, []
                self._cond.notify_all()
            for callback in callbacks:
                callback()

    def _loop(self) -> None:
        backoff = RETRY_FIRST_S
        while True:
            with self._cond:
                while self._done >= self._requested and not self._closing:
                    self._cond.wait()
                if self._closing and self._done >= self._requested:
                    return
                generation = self._requested
            try:
                if self._entries is None:
                    self._open()
                self._sync(generation)
            except MirrorError as e:  # fenced off by a newer writer, or a manifest this version cannot read
                self.stopped = str(e)
                logger.error("%s", e)
                return
            except Exception as e:  # noqa: BLE001 - a mirror outage must never stop training: retried below
                if not self._failing:
                    logger.warning("the mirror %s failed: %s; retrying in the background, training goes on",
                                   mask(self.remote.url), one_line(e))
                self._failing = True
                deadline = time.monotonic() + backoff
                with self._cond:  # new requests do not shorten the wait: an outage is retried at the backoff rate
                    while not self._closing and (left := deadline - time.monotonic()) > 0:
                        self._cond.wait(left)
                    if self._closing:
                        return  # closed during an outage: what the mirror holds is what it holds
                backoff = min(backoff * 2, RETRY_MAX_S)
                continue
            if self._failing:
                logger.warning("the mirror %s is reachable again", mask(self.remote.url))
            self._failing, backoff = False, RETRY_FIRST_S
            with self._cond:
                self._done = max(self._done, generation)
                self._cond.notify_all()

    def _open(self) -> None:
        """Claim the prefix (the newest opener owns it), then remove what no manifest lists."""
        for _ in range(5):
            entries, token = self.remote.read_manifest()
            try:
                self._token = self.remote.write_manifest(entries, writer=self.writer, expect=token)
                break
            except MirrorFenced:
                continue  # another run wrote between the read and the claim: read again, then claim
        else:
            raise OSError("the mirror's manifest kept changing while this run tried to open it")
        self.remote.remove_unlisted(keys(entries))
        self._entries = entries
        latest = entries.get(layout.LATEST)
        self.mirrored_step = latest.step if latest else None

    def _superseded(self, generation: int) -> bool:
        with self._cond:
            return self._requested > generation or self._closing

    def _sync(self, generation: int) -> None:
        assert self._entries is not None
        started, sent, failures = time.perf_counter(), 0, []
        with self.between_saves:
            local = {i.name: i for i in scan(self.directory) if i.ok}
        up = {digest: ref for e in self._entries.values() for digest, ref in e.objects().items()}
        wanted = sorted(local.values(), key=lambda i: (_PRIORITY.get(i.name, 1 if i.kind != "rolling" else 4),
                                                        -(i.step or 0)))
        for info in wanted:
            digest = info.meta["digest"]
            if _entry(info, up) is not None or digest in self._damaged:
                continue  # already on the mirror (perhaps under another name), or never to be sent
            if self._closing:
                break
            if info.kind == "rolling" and info.name != layout.LATEST and self._superseded(generation):
                continue  # the mirror lags: this intermediate rolling file is skipped, the newest goes first
            # latest.pt is replaced at every save: read the same bytes under the name they are kept under.
            name = layout.stable_name(n for n, i in local.items() if i.meta["digest"] == digest)
            try:
                uploaded = self.remote.upload(local[name].path if name else info.path, already_up=up.keys())
            except FileNotFoundError:
                continue  # pruned locally meanwhile: it will not be listed
            except fileformat.CorruptCheckpointError as e:
                # The local copy is damaged: it never becomes an object, and the mirror keeps what it had
                # under that name. Said once; the other files still go up and the sync succeeds.
                self._damaged.add(digest)
                logger.warning("%s is not uploaded to the mirror: %s", name or info.name, one_line(e))
                failures.append(e)
                continue
            up.update(uploaded)  # another checkpoint than listed, if the name was replaced: listed next time
            sent += sum(ref.bytes for ref in uploaded.values())
            self._commit(local, up)
        self._commit(local, up)
        self.uploaded_bytes += sent
        self.on_sync({"mirrored_step": self.mirrored_step, "upload_s": time.perf_counter() - started,
                      "upload_bytes": sent, "damaged_local_files": len(failures)})

    def _commit(self, local: dict[str, CheckpointInfo], up: dict[str, ObjectRef]) -> None:
        """Write the manifest both tiers' policies decide, then delete the objects it no longer lists."""
        assert self._entries is not None
        uploaded = {n: entry for n, i in local.items() if (entry := _entry(i, up)) is not None}
        entries = plan_manifest(uploaded, self._entries, self.retention)
        if entries == self._entries:
            return
        listed_before = keys(self._entries)
        self._token = self.remote.write_manifest(entries, writer=self.writer, expect=self._token)
        self._entries = entries
        self.remote.delete(listed_before - keys(entries))  # only after the manifest is durable, and ours
        latest = entries.get(layout.LATEST)
        self.mirrored_step = latest.step if latest else self.mirrored_step


def _entry(info: CheckpointInfo, up: dict[str, ObjectRef]) -> Entry | None:
    """The manifest entry of a local checkpoint, or None while any of its objects is not up."""
    digest = info.meta["digest"]
    # From the footer, not the disk: retention may have removed the directory since it was listed, and an
    # entry for a sharded checkpoint without its files would be listed on the bucket as a lone state.pt.
    shards = info.meta.get("shards")
    if digest not in up or any(f["digest"] not in up for f in (shards or {}).values()):
        return None
    files = None if shards is None else {
        name: {"key": up[f["digest"]].key, "digest": f["digest"], "bytes": f["bytes"]} for name, f in shards.items()}
    lineage = info.meta.get("lineage")
    line = {"run": lineage.get("run"), "ancestry": lineage.get("ancestry") or []} if isinstance(lineage, dict) else None
    top = info.meta.get("metrics") if info.kind == "top" else None  # what ranks it among the K best
    return Entry(info.name, up[digest].key, digest, up[digest].bytes, info.step, info.kind, info.saved_at, files,
                 line, top)
