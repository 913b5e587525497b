"""The background uploader of the second tier: the local store, mirrored by a RemoteStore.

    remote = RemoteStore.open("s3://bucket/run1", {"endpoint_url": ...})
    mirror = Mirror(remote, Path("checkpoints"))   # cleans what no manifest lists, then waits for requests
    mirror.request()                    # after each committed local save; never blocks
    mirror.request(wait=20.0)           # an emergency: wait for it, within a budget

Each sync uploads what the local store holds and the mirror does not (each distinct file once,
verified: see remote.py), then writes a manifest listing exactly the local store's names, then
deletes the objects that manifest no longer lists. So retention on the mirror follows the local
families, and an object is deleted only after a manifest without it is durable.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import fileformat, layout, storage
from .records import CheckpointInfo, scan
from .remote import Entry, ObjectRef, RemoteStore, mask, one_line

logger = logging.getLogger("train_improved.checkpoint")
# Upload order when the mirror lags: what a resume needs first. Rolling files are skipped while a
# newer request waits (coalescing); the newest state always goes up first.
_PRIORITY = {layout.LATEST: 0, layout.BEST: 2, layout.BEST_PREVIOUS: 3}


class Mirror:
    """The background uploader: keeps the remote manifest equal to the local store, newest state first.

    It runs in its own thread, apart from the save writer, so it never delays a local commit. A
    request made while an upload runs is coalesced: intermediate rolling files are skipped and
    the newest state goes up next. Failures are warned about once, then retried with backoff.
    """

    def __init__(self, remote: RemoteStore, directory: Path, on_sync: Callable[[dict[str, Any]], None] | None = None
                 ) -> None:
        self.remote, self.directory = remote, directory
        self.on_sync = on_sync or (lambda record: None)
        self.uploaded_bytes = 0
        self._cond = threading.Condition()
        self._requested = 0  # generation of the newest request
        self._done = 0  # generation the last finished sync started from
        self._closing = False
        self._failing = False
        remote.yield_cpu_to_training()
        self._entries = remote.manifest()
        remote.remove_unlisted(_keys(self._entries))
        latest = self._entries.get(layout.LATEST)
        self.mirrored_step: int | None = latest.step if latest else None
        self._thread = threading.Thread(target=self._run, name="checkpoint-mirror", daemon=True)
        self._thread.start()

    def request(self, wait: float | None = None) -> bool:
        """Ask for a sync of the local store; with `wait`, block up to that many seconds for it to finish.

        Returns whether the mirror holds everything the local store held at the time of the request.
        """
        with self._cond:
            self._requested += 1
            mine = self._requested
            self._cond.notify_all()
            if wait is None:
                return False
            deadline = time.monotonic() + wait
            while self._done < mine and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            return self._done >= mine

    def close(self, wait: float) -> bool:
        """Finish the last request within `wait` seconds, then stop the thread; whether it caught up."""
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

    def lag(self, local_step: int | None) -> int | None:
        if local_step is None:
            return None
        return local_step - (self.mirrored_step or 0)

    def _run(self) -> None:
        storage.yield_cpu_to_training()
        backoff = 1.0
        while True:
            with self._cond:
                while self._done >= self._requested and not self._closing:
                    self._cond.wait()
                if self._closing and self._done >= self._requested:
                    return
                generation = self._requested
            try:
                self._sync(generation)
            except Exception as e:  # noqa: BLE001 - a mirror outage must never stop training: retried below
                if not self._failing:
                    logger.warning("the mirror %s failed: %s; retrying in the background, training goes on",
                                   mask(self.remote.url), one_line(e))
                self._failing = True
                with self._cond:
                    self._cond.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            if self._failing:
                logger.warning("the mirror %s is reachable again", mask(self.remote.url))
            self._failing, backoff = False, 1.0
            with self._cond:
                self._done = max(self._done, generation)
                self._cond.notify_all()

    def _superseded(self, generation: int) -> bool:
        with self._cond:
            return self._requested > generation

    def _sync(self, generation: int) -> None:
        started, sent, failures = time.perf_counter(), 0, []
        local = {i.name: i for i in scan(self.directory) if i.ok}
        up = {digest: ref for e in self._entries.values() for digest, ref in e.objects().items()}
        wanted = sorted(local.values(), key=lambda i: (_PRIORITY.get(i.name, 1 if i.kind != "rolling" else 4),
                                                        -(i.step or 0)))
        for info in wanted:
            if _entry(info, up) is not None:
                continue  # already on the mirror, perhaps under another name
            if info.kind == "rolling" and info.name != layout.LATEST and self._superseded(generation):
                continue  # the mirror lags: this intermediate rolling file is skipped, the newest goes first
            # latest.pt is replaced at every save: read the same bytes under their own, stable name.
            source = next((i.path for i in local.values() if i.meta["digest"] == info.meta["digest"]
                           and i.name not in (layout.LATEST, layout.LATEST_BACKUP)), info.path)
            try:
                uploaded = self.remote.upload(source, already_up=up.keys())
            except FileNotFoundError:
                continue  # pruned locally meanwhile: it will not be listed
            except fileformat.CorruptCheckpointError as e:
                failures.append(e)  # this one file; the others still go up, the sync is retried
                continue
            up.update(uploaded)  # another checkpoint than listed, if the name was replaced: listed next time
            sent += sum(ref.bytes for ref in uploaded.values())
            self._commit(local, up)
        self._commit(local, up)
        self.uploaded_bytes += sent
        self.on_sync({"mirrored_step": self.mirrored_step, "upload_s": time.perf_counter() - started,
                      "upload_bytes": sent})
        if failures:
            raise failures[0]

    def _commit(self, local: dict[str, CheckpointInfo], up: dict[str, ObjectRef]) -> None:
        """Write the manifest of every local name whose objects are up, then delete what it no longer lists."""
        entries = {n: entry for n, i in local.items() if (entry := _entry(i, up)) is not None}
        if entries == self._entries:
            return
        listed_before = _keys(self._entries)
        self.remote.write_manifest(entries)
        self._entries = entries
        self.remote.delete(listed_before - _keys(entries))  # only after the manifest is durable
        latest = entries.get(layout.LATEST)
        self.mirrored_step = latest.step if latest else self.mirrored_step


def _entry(info: CheckpointInfo, up: dict[str, ObjectRef]) -> Entry | None:
    """The manifest entry of a local checkpoint, or None while any of its objects is not up."""
    digest = info.meta["digest"]
    shards = info.meta.get("shards") if info.path.is_dir() else None
    if digest not in up or any(f["digest"] not in up for f in (shards or {}).values()):
        return None
    files = None if shards is None else {
        name: {"key": up[f["digest"]].key, "digest": f["digest"], "bytes": f["bytes"]} for name, f in shards.items()}
    return Entry(info.name, up[digest].key, digest, up[digest].bytes, info.step, info.kind, info.saved_at, files)


def _keys(entries: dict[str, Entry]) -> set[str]:
    """Every object a manifest's entries need."""
    return {ref.key for e in entries.values() for ref in e.objects().values()}
