"""The second tier: the checkpoint store mirrored to any fsspec URL, so training survives the machine.

    remote = RemoteStore.open("s3://bucket/run1", {"endpoint_url": ...})   # checked: one clear line if unusable
    mirror = Mirror(remote, Path("checkpoints"))                            # a background uploader
    mirror.request()                    # after each committed local save; never blocks
    mirror.request(wait=20.0)           # an emergency: wait for it, within a budget
    remote.fetch("latest", Path("checkpoints"))   # a new machine: download, verify, place locally

Layout under the URL:

    objects/<digest>.pt       one object per distinct checkpoint file (latest.pt and the rolling
                              file it names are one object), keyed by its xxh3-128 digest
    manifest.json             the commit point: the names of the local store (latest.pt,
                              rolling_step_000250.pt, best_model.pt, ...) with their object, size,
                              digest, step and kind; written last, in one PUT
    tmp/                      uploads in progress; removed at the next start

An object is uploaded under a temporary key, read back as a stream and checked against its size
and the digest in its footer, and only then moved to its key and listed in a new manifest. Readers
trust only the manifest. An object is deleted only after a manifest that no longer lists it has been
written. Retention follows the local store: the manifest lists what the local store holds.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from . import fileformat, layout, storage
from .fileformat import CheckpointError, CorruptCheckpointError
from .records import NoCheckpointError, scan

logger = logging.getLogger("train_improved.checkpoint")
MANIFEST = "manifest.json"
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
_CHUNK = 8 << 20
# Upload order when the mirror lags: what a resume needs first. Rolling files are skipped while a
# newer request waits (coalescing); the newest state always goes up first.
_PRIORITY = {layout.LATEST: 0, layout.BEST: 2, layout.BEST_PREVIOUS: 3}


class MirrorError(CheckpointError):
    """The mirror cannot be used (bad URL, missing extra, credentials, bucket): one clear line."""


def mask(url: str) -> str:
    """The URL with any password or key in it replaced, for messages, logs and stored options."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    return urlunsplit(parts._replace(netloc=f"***@{host}" + (f":{parts.port}" if parts.port else "")))


@dataclass(frozen=True)
class Entry:
    """One name of the manifest."""

    name: str
    key: str  # the object, relative to the mirror's root
    digest: str
    bytes: int
    step: int | None
    kind: str | None
    saved_at: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "digest": self.digest, "bytes": self.bytes, "step": self.step, "kind": self.kind,
                "saved_at": self.saved_at}


class RemoteStore:
    """One mirror URL: the manifest and its objects, through fsspec."""

    def __init__(self, fs: Any, root: str, url: str) -> None:
        self.fs, self.root, self.url = fs, root.rstrip("/"), url

    @classmethod
    def open(cls, url: str, options: dict[str, Any] | None = None, *, check_writable: bool = True) -> RemoteStore:
        """Connect and check the mirror; raise MirrorError with one line if it cannot be used."""
        shown = mask(url)
        if "://" not in url:
            raise MirrorError(f"--mirror {shown}: expected a URL such as s3://bucket/prefix or file:///path")
        protocol = url.split("://", 1)[0]
        try:
            import fsspec
        except ImportError:
            raise MirrorError("--mirror needs fsspec, a dependency of train_improved: pip install fsspec") from None
        try:
            fs, root = fsspec.core.url_to_fs(url, **(options or {}))
        except ImportError:
            extra = _EXTRAS.get(protocol, protocol)
            raise MirrorError(f'--mirror {shown}: the {protocol}:// protocol needs an extra: '
                              f'pip install "train_improved[{extra}]"') from None
        except (ValueError, TypeError) as e:
            raise MirrorError(f"--mirror {shown}: {_one_line(e)}") from None
        store = cls(fs, root, url)
        try:
            if check_writable and _is_local(fs):  # a filesystem needs its directories (an object store does not)
                for sub in ("tmp", "objects"):
                    fs.makedirs(f"{store.root}/{sub}", exist_ok=True)
            if check_writable:
                probe = f"{store.root}/tmp/probe-{secrets.token_hex(4)}"
                fs.pipe_file(probe, b"probe")
                fs.rm_file(probe)
            else:
                try:
                    fs.ls(store.root)
                except FileNotFoundError:
                    pass  # nothing written under this prefix yet: an empty mirror
        except Exception as e:  # noqa: BLE001 - any failure here is the user's URL, bucket or credentials
            raise MirrorError(f"--mirror {shown}: cannot {'write' if check_writable else 'read'} there: "
                              f"{_one_line(e)}") from None
        return store

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}"

    # ------------------------------------------------------------------ the manifest

    def manifest(self) -> dict[str, Entry]:
        """The committed names, or {} for a mirror nothing has been written to yet."""
        try:
            data = json.loads(self.fs.cat_file(self._path(MANIFEST)))
        except FileNotFoundError:
            return {}
        return {name: Entry(name, **e) for name, e in data.get("entries", {}).items()}

    def write_manifest(self, entries: dict[str, Entry]) -> None:
        body = json.dumps({"format_version": 1, "written": time.time(),
                           "entries": {n: e.as_dict() for n, e in sorted(entries.items())}}, indent=1).encode()
        if _is_local(self.fs):  # a filesystem has rename: write aside, fsync, replace in one step
            storage.replace_file(Path(self._path(MANIFEST)), body)
        else:  # an object store: one PUT is atomic
            self.fs.pipe_file(self._path(MANIFEST), body)

    # ------------------------------------------------------------------ objects

    def upload(self, path: Path) -> tuple[str, str]:
        """Upload one checkpoint file under a temporary key, verify it as read back, give it its key.

        Returns (key, digest) of what was uploaded: the file as opened, whatever replaced the name since
        it was listed (a save moving latest.pt), so the object always matches its key.
        """
        with open(path, "rb") as src:
            size = os.fstat(src.fileno()).st_size
            digest = fileformat._read_footer(src, size)["digest"]
            src.seek(0)
            key = f"objects/{digest}.pt"
            tmp = self._path(f"tmp/{digest}.{secrets.token_hex(4)}")
            try:
                self._put(src, tmp)
                self.verify(tmp, size, digest)
                self.fs.mv(tmp, self._path(key))
                if _is_local(self.fs):
                    storage.fsync_dir(Path(self._path(key)).parent)
            except BaseException:
                self._remove(tmp)
                raise
        return key, digest

    def _put(self, src: Any, remote: str) -> None:
        local = _is_local(self.fs)
        with open(remote, "xb") if local else self.fs.open(remote, "wb", block_size=_CHUNK * 8) as dst:
            while chunk := src.read(_CHUNK):
                dst.write(chunk)
            if local:  # on a filesystem, durable before any manifest can list it
                dst.flush()
                storage.fsync(dst.fileno())

    def verify(self, remote: str, size: int, digest: str) -> None:
        """Stream an object back and check its size and the digest in its footer; CorruptCheckpointError if not."""
        actual = self.fs.size(remote)
        if actual != size:
            raise CorruptCheckpointError(f"{remote} holds {actual} bytes, {size} were uploaded")
        with self.fs.open(remote, "rb", block_size=_CHUNK) as f:
            try:
                fileformat.verify_stream(f, size, expected_digest=digest)
            except CorruptCheckpointError as e:
                raise CorruptCheckpointError(f"{remote}: {e}") from None

    def verify_entry(self, entry: Entry) -> None:
        self.verify(self._path(entry.key), entry.bytes, entry.digest)

    def delete(self, keys: set[str]) -> None:
        for key in sorted(keys):
            self._remove(self._path(key))

    def clean_temporaries(self) -> None:
        """Remove uploads a killed process left under tmp/ (never listed by any manifest)."""
        try:
            for leftover in self.fs.ls(self._path("tmp"), detail=False):
                self._remove(leftover)
        except FileNotFoundError:
            pass

    def _remove(self, path: str) -> None:
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------------ downloading

    def fetch(self, which: str, directory: Path) -> Path:
        """Download the checkpoint `which` ("latest", "best" or a name) into `directory`, verified.

        Tries the manifest's candidates in the order of the local fallback chain, saying why it
        skips each one. Raises NoCheckpointError if the mirror holds no such checkpoint, CheckpointError
        if none of its candidates verifies. Returns the local path.
        """
        entries = self.manifest()
        if not entries:
            raise NoCheckpointError(f"the mirror {mask(self.url)} holds no checkpoint")
        if which == "latest":  # latest.pt (the local store's own choice, on its line of training), then newest
            order = sorted(entries.values(), key=lambda e: (e.name == layout.LATEST, e.step or -1), reverse=True)
        elif which == "best":
            order = [entries[n] for n in (layout.BEST, layout.BEST_BACKUP, layout.BEST_PREVIOUS) if n in entries]
        else:
            order = [entries[which]] if which in entries else []
        if not order:
            raise NoCheckpointError(f"the mirror {mask(self.url)} holds no {which}")
        failures = []
        for entry in order:
            # latest.pt is another name's object: it is placed under that name (resume finds it there).
            name = next((n for n, e in sorted(entries.items()) if e.digest == entry.digest
                         and n not in (layout.LATEST, layout.LATEST_BACKUP)), entry.name)
            try:
                return self._download(entry, directory / name)
            except (CorruptCheckpointError, OSError) as e:
                failures.append(f"  {entry.name} (mirror): {_one_line(e)}")
                logger.warning("%s on the mirror failed verification: %s", entry.name, _one_line(e))
        raise CheckpointError(f"no valid checkpoint on the mirror {mask(self.url)}: all {len(failures)} failed "
                              "verification:\n" + "\n".join(failures))

    def _download(self, entry: Entry, final: Path) -> Path:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = storage.temp_path_for(final)
        try:
            with self.fs.open(self._path(entry.key), "rb", block_size=_CHUNK) as src, open(tmp, "xb") as dst:
                while chunk := src.read(_CHUNK):
                    dst.write(chunk)
                dst.flush()
                storage.fsync(dst.fileno())
            footer = fileformat.verify_file(tmp, expected_digest=entry.digest)
            storage.commit_temporary(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        logger.warning("downloaded %s (step %s) from the mirror %s into %s", final.name, footer.get("step"),
                       mask(self.url), final.parent)
        return final


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
        remote.clean_temporaries()
        self._entries = remote.manifest()
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
                                   mask(self.remote.url), _one_line(e))
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
        started, sent = time.perf_counter(), 0
        local = {i.name: i for i in scan(self.directory) if i.ok and i.path.is_file()}
        by_digest = {e.digest: e.key for e in self._entries.values()}
        wanted = sorted(local.values(), key=lambda i: (_PRIORITY.get(i.name, 1 if i.kind != "rolling" else 4),
                                                        -(i.step or 0)))
        for info in wanted:
            digest = info.meta["digest"]
            if digest in by_digest:
                continue
            if info.kind == "rolling" and info.name != layout.LATEST and self._superseded(generation):
                continue  # the mirror lags: this intermediate rolling file is skipped, the newest goes first
            # latest.pt is replaced at every save: read the same bytes under their own, stable name.
            source = next((i.path for i in local.values() if i.meta["digest"] == digest
                           and i.name not in (layout.LATEST, layout.LATEST_BACKUP)), info.path)
            try:
                key, uploaded = self.remote.upload(source)
            except FileNotFoundError:
                continue  # pruned locally meanwhile: it will not be listed
            by_digest[uploaded] = key  # another file than listed, if the name was replaced: listed next time
            sent += info.size
            self._commit(local, by_digest)
        self._commit(local, by_digest)
        self.uploaded_bytes += sent
        self.on_sync({"mirrored_step": self.mirrored_step, "upload_s": time.perf_counter() - started,
                      "upload_bytes": sent})

    def _commit(self, local: dict[str, Any], by_digest: dict[str, str]) -> None:
        """Write the manifest of every local name whose object is up, then delete what it no longer lists."""
        entries = {n: Entry(n, by_digest[i.meta["digest"]], i.meta["digest"], i.size, i.step, i.kind, i.saved_at)
                   for n, i in local.items() if i.meta["digest"] in by_digest}
        if entries == self._entries:
            return
        listed_before = {e.key for e in self._entries.values()}
        self.remote.write_manifest(entries)
        self._entries = entries
        self.remote.delete(listed_before - {e.key for e in entries.values()})  # only after the manifest is durable
        latest = entries.get(layout.LATEST)
        self.mirrored_step = latest.step if latest else self.mirrored_step


def _is_local(fs: Any) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__
