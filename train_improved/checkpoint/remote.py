"""The mirror's remote side: a manifest and content-keyed objects under any fsspec URL.

    remote = RemoteStore.open("s3://bucket/run1", {"endpoint_url": ...})   # checked: one clear line if unusable
    objects = remote.upload(Path("checkpoints/rolling_step_000250.pt"))    # verified, not yet listed
    remote.write_manifest(entries)                                          # the commit point
    remote.fetch("latest", Path("checkpoints"))     # a new machine: download, verify, place locally

Layout under the URL:

    objects/<digest>.pt       one object per distinct checkpoint file, keyed by its xxh3-128 digest
                              (latest.pt and the rolling file it names are one object)
    objects/<digest>.shard    one per file of a sharded (--fsdp) checkpoint: its DCP files
    manifest.json             the commit point: the names of the local store (latest.pt,
                              rolling_step_000250.pt, best_model.pt, ...) with their object(s),
                              sizes, digests, step and kind; written last, in one PUT
    tmp/                      uploads in progress (filesystems and stores without server MD5s)

No object is listed before it is verified. On S3 it is uploaded in one read straight to its key, in
concurrent parts (an object appears only when complete); our digest of the bytes read must equal
the footer's, and the server's MD5 of every part (its ETag) must equal ours (`s3_upload`).
Elsewhere it is uploaded under tmp/, read back as a stream and checked against its size and
digest, then moved to its key. Readers trust only the manifest. At the start of a run, what no
manifest lists (temporaries, incomplete uploads, objects a kill left unlisted) is removed.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit, urlunsplit

from . import fileformat, layout, s3_upload, storage
from .fileformat import CheckpointError, CorruptCheckpointError, StreamDigest
from .records import NoCheckpointError

logger = logging.getLogger("train_improved.checkpoint")
MANIFEST = "manifest.json"
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
_CHUNK = 8 << 20


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

    def as_dict(self) -> dict[str, Any]:
        out = {"key": self.key, "digest": self.digest, "bytes": self.bytes, "step": self.step, "kind": self.kind,
               "saved_at": self.saved_at}
        return out if self.files is None else {**out, "files": self.files}

    def objects(self) -> dict[str, ObjectRef]:
        """digest -> object, for every object this entry needs."""
        return {self.digest: ObjectRef(self.key, self.bytes),
                **{f["digest"]: ObjectRef(f["key"], f["bytes"]) for f in (self.files or {}).values()}}

    @property
    def total_bytes(self) -> int:
        return self.bytes + sum(f["bytes"] for f in (self.files or {}).values())


class RemoteStore:
    """One mirror URL: the manifest and its objects, through fsspec."""

    def __init__(self, fs: Any, root: str, url: str) -> None:
        self.fs, self.root, self.url = fs, root.rstrip("/"), url
        self.server_md5 = s3_upload.supports(fs)  # False once an ETag turned out not to be an MD5

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
            raise MirrorError(f"--mirror {shown}: {one_line(e)}") from None
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
                              f"{one_line(e)}") from None
        return store

    def yield_cpu_to_training(self) -> None:
        """Lower the CPU priority of the thread that does this store's network I/O (an async
        filesystem's event loop: s3fs, gcsfs), as the uploader's own: training should win the cores.

        That loop is fsspec's one I/O thread, shared by every async fsspec filesystem of the process.
        """
        loop = getattr(self.fs, "loop", None)
        if loop is not None:
            loop.call_soon_threadsafe(storage.yield_cpu_to_training)

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

    # ------------------------------------------------------------------ uploading

    def upload(self, path: Path, already_up: Collection[str] = ()) -> dict[str, ObjectRef]:
        """Upload the checkpoint at `path` (a file, or a sharded directory), every object verified.

        Returns digest -> object for what was uploaded: the checkpoint as opened, whatever replaced
        the name since it was listed (a save moving latest.pt), so every object matches its key.
        Files of a sharded checkpoint whose digest is in `already_up` are not sent again. Nothing
        is listed yet: write_manifest() does that.
        """
        if not path.is_dir():
            with open(path, "rb") as src:
                return dict([self._upload_checkpoint_file(src)[:2]])
        with _directory(path) as open_member:  # every file from one checkpoint, even if the name is replaced
            with open_member(fileformat.STATE_FILE) as src:
                digest, ref, meta = self._upload_checkpoint_file(src)
            uploaded = {digest: ref}
            for name, expected in sorted(meta.get("shards", {}).items()):
                if expected["digest"] in already_up:
                    continue
                with open_member(name) as src:
                    size = os.fstat(src.fileno()).st_size
                    key = f"objects/{expected['digest']}.shard"
                    self._upload_object(src, size, StreamDigest(size), expected["digest"], key, footer=False)
                    uploaded[expected["digest"]] = ObjectRef(key, size)
        return uploaded

    def _upload_checkpoint_file(self, src: BinaryIO) -> tuple[str, ObjectRef, dict[str, Any]]:
        size = os.fstat(src.fileno()).st_size
        meta = fileformat._read_footer(src, size)
        src.seek(0)
        key = f"objects/{meta['digest']}.pt"
        self._upload_object(src, size, StreamDigest.of_checkpoint(meta), meta["digest"], key, footer=True)
        return meta["digest"], ObjectRef(key, size), meta

    def _upload_object(self, src: BinaryIO, size: int, read: StreamDigest, digest: str, key: str, *,
                       footer: bool) -> None:
        if self.server_md5:
            def bytes_read_are_the_checkpoint() -> None:
                if read.hexdigest() != digest:
                    raise CorruptCheckpointError(f"{getattr(src, 'name', key)}: the bytes read differ from its "
                                                 "digest (damaged on the local disk?)")
            try:
                s3_upload.put(self.fs, self._path(key), src, size, read.update, bytes_read_are_the_checkpoint)
                return
            except s3_upload.ServerChecksumMismatch as e:
                logger.warning("%s; uploads to %s are verified by reading them back from now on", e,
                               mask(self.url))
                self.server_md5 = False
                src.seek(0)
            finally:
                self.fs.invalidate_cache(self._path(key))
        tmp = self._path(f"tmp/{digest}.{secrets.token_hex(4)}")
        try:
            self._put(src, tmp)
            self.verify(tmp, size, digest, footer=footer)
            self.fs.mv(tmp, self._path(key))
            if _is_local(self.fs):
                storage.fsync_dir(Path(self._path(key)).parent)
        except BaseException:
            self._remove(tmp)
            raise

    def _put(self, src: BinaryIO, remote: str) -> None:
        local = _is_local(self.fs)
        with open(remote, "xb") if local else self.fs.open(remote, "wb", block_size=_CHUNK * 8) as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
            if local:  # on a filesystem, durable before any manifest can list it
                dst.flush()
                storage.fsync(dst.fileno())

    # ------------------------------------------------------------------ checking, cleaning

    def verify(self, remote: str, size: int, digest: str, *, footer: bool = True) -> None:
        """Stream an object back and check its size and digest (its footer's, for a checkpoint file).

        Raises CorruptCheckpointError naming the object.
        """
        actual = self.fs.size(remote)
        if actual != size:
            raise CorruptCheckpointError(f"{remote} holds {actual} bytes, {size} were uploaded")
        with self.fs.open(remote, "rb", block_size=_CHUNK) as f:
            try:
                if footer:
                    fileformat.verify_stream(f, size, expected_digest=digest)
                elif fileformat._hash_open(f, size) != digest:
                    raise CorruptCheckpointError("checksum mismatch (the object differs from the file)")
            except CorruptCheckpointError as e:
                raise CorruptCheckpointError(f"{remote}: {e}") from None

    def verify_entry(self, entry: Entry) -> None:
        """Re-hash every object of one manifest entry as a stream (`--list-checkpoints --mirror URL --verify`)."""
        self.verify(self._path(entry.key), entry.bytes, entry.digest)
        for f in (entry.files or {}).values():
            self.verify(self._path(f["key"]), f["bytes"], f["digest"], footer=False)

    def delete(self, keys: set[str]) -> None:
        for key in sorted(keys):
            self._remove(self._path(key))

    def remove_unlisted(self, listed: set[str]) -> None:
        """Remove what no manifest lists: temporaries, incomplete uploads, objects a kill left unlisted.

        Only for the one process that writes this mirror, before it uploads anything.
        """
        for sub in ("tmp", "objects"):
            try:
                found = self.fs.ls(self._path(sub), detail=False, refresh=True)
            except FileNotFoundError:
                continue
            for path in found:
                if f"{sub}/{path.rstrip('/').rsplit('/', 1)[-1]}" not in listed:
                    self._remove(path)
        if self.server_md5:
            s3_upload.abort_incomplete(self.fs, self._path("objects/"))

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
                failures.append(f"  {entry.name} (mirror): {one_line(e)}")
                logger.warning("%s on the mirror failed verification: %s", entry.name, one_line(e))
        raise CheckpointError(f"no valid checkpoint on the mirror {mask(self.url)}: all {len(failures)} failed "
                              "verification:\n" + "\n".join(failures))

    def _download(self, entry: Entry, final: Path) -> Path:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = storage.temp_path_for(final)
        try:
            if entry.files is None:
                self._download_object(entry.key, tmp)
            else:  # a sharded checkpoint: its directory, whole, then one rename
                tmp.mkdir()
                self._download_object(entry.key, tmp / fileformat.STATE_FILE)
                for name, f in entry.files.items():
                    self._download_object(f["key"], tmp / name)
                storage.fsync_dir(tmp)
            footer = fileformat.verify_file(tmp, expected_digest=entry.digest)
            storage.commit_temporary(tmp, final)
        except BaseException:
            if tmp.exists():
                storage.remove(tmp)
            raise
        logger.warning("downloaded %s (step %s) from the mirror %s into %s", final.name, footer.get("step"),
                       mask(self.url), final.parent)
        return final

    def _download_object(self, key: str, local: Path) -> None:
        with self.fs.open(self._path(key), "rb", block_size=_CHUNK) as src, open(local, "xb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
            dst.flush()
            storage.fsync(dst.fileno())


@contextmanager
def _directory(path: Path) -> Iterator[Any]:
    """open(name) for the files of one directory, through one descriptor of it."""
    dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield lambda name: open(name, "rb", opener=lambda n, flags: os.open(n, flags, dir_fd=dir_fd))
    finally:
        os.close(dir_fd)


def _is_local(fs: Any) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def one_line(e: BaseException) -> str:
    """An exception as one short line, for warnings and the fallback story."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__
