"""The mirror's remote side: a manifest and content-keyed objects under any fsspec URL.

    remote = RemoteStore.open("s3://bucket/run1", {"endpoint_url": ...})   # checked: one clear line if unusable
    objects = remote.upload(Path("checkpoints/rolling_step_000250.pt"))    # verified, not yet listed
    remote.write_manifest(entries)                                          # the commit point
    remote.fetch("latest", Path("checkpoints"))     # a new machine: download, verify, place locally

Layout under the URL:

    objects/<digest>.pt       one object per distinct checkpoint file, keyed by its xxh3-128 digest
                              (latest.pt and the rolling file it names are one object)
    objects/<digest>.shard    one per file of a sharded (--fsdp) checkpoint: its DCP files
    manifest.json             the commit point and the mirror's own inventory: names (latest.pt,
                              rolling_step_000250.pt, best_model.pt, ...) with their object(s),
                              sizes, digests, step, kind and line of training, and its writer;
                              written last, in one conditional PUT (see `inventory`, `write_manifest`)
    tmp/                      uploads in progress (filesystems and stores without server MD5s)

No object is listed before it is verified. On S3 it is uploaded in one read straight to its key, in
concurrent parts (an object appears only when complete); our digest of the bytes read must equal
the footer's, and the server's MD5 of every part (its ETag) must equal ours (`s3_upload`).
Elsewhere it is uploaded under tmp/, read back as a stream and checked against its size and
digest, then moved to its key. Readers trust only the manifest. At the start of a run, what no
manifest lists (temporaries, incomplete uploads, objects a kill left unlisted) is removed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit, urlunsplit

from . import fallback, fileformat, layout, s3_upload, storage
from .fileformat import CheckpointError, CorruptCheckpointError, StreamDigest
from .inventory import Entry, ObjectRef
from .records import NoCheckpointError

logger = logging.getLogger("train_improved.checkpoint")
MANIFEST = "manifest.json"
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
_CHUNK = 8 << 20


MANIFEST_FORMAT = 2  # 2: entries carry their line of training; the manifest names its writer
_MANIFEST_LOCK = ".manifest.lock"


class MirrorError(CheckpointError):
    """The mirror cannot be used (bad URL, missing extra, credentials, bucket): one clear line."""


class MirrorFenced(MirrorError):
    """Another run opened this mirror prefix since this one did: it owns the prefix now (one writer per prefix)."""


def mask(url: str) -> str:
    """The URL with any password or key in it replaced, for messages, logs and stored options."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    return urlunsplit(parts._replace(netloc=f"***@{host}" + (f":{parts.port}" if parts.port else "")))


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
            raise MirrorError(f"mirror {shown}: expected a URL such as s3://bucket/prefix or file:///path")
        protocol = url.split("://", 1)[0]
        try:
            import fsspec
        except ImportError:
            raise MirrorError("a mirror needs fsspec, a dependency of train_improved: pip install fsspec") from None
        try:
            fs, root = fsspec.core.url_to_fs(url, **(options or {}))
        except ImportError:
            extra = _EXTRAS.get(protocol, protocol)
            raise MirrorError(f'mirror {shown}: the {protocol}:// protocol needs an extra: '
                              f'pip install "train_improved[{extra}]"') from None
        except (ValueError, TypeError) as e:
            raise MirrorError(f"mirror {shown}: {one_line(e)}") from None
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
            raise MirrorError(f"mirror {shown}: cannot {'write' if check_writable else 'read'} there: "
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
        return self.read_manifest()[0]

    def read_manifest(self) -> tuple[dict[str, Entry], str | None]:
        """The committed names and a token for this version of the manifest (None: there is no manifest).

        Raises MirrorError for a manifest written by a newer train_improved, rather than misread it.
        """
        body, token = self._read_manifest_bytes()
        if body is None:
            return {}, None
        data = json.loads(body)
        version = data.get("format_version", 1)
        if not isinstance(version, int) or version > MANIFEST_FORMAT:
            raise MirrorError(f"the mirror {mask(self.url)} has a manifest of format {version}, newer than this "
                              f"train_improved reads ({MANIFEST_FORMAT}): upgrade train_improved to use it")
        return {name: Entry.from_dict(name, e) for name, e in data.get("entries", {}).items()}, token

    def writer(self) -> dict[str, Any] | None:
        """Who wrote the manifest last (run, host, pid, since), or None."""
        body, _ = self._read_manifest_bytes()
        return json.loads(body).get("writer") if body is not None else None

    def _read_manifest_bytes(self) -> tuple[bytes | None, str | None]:
        path = self._path(MANIFEST)
        if s3_upload.supports(self.fs):  # the ETag of the very version read: what a conditional write names
            got = s3_upload.get_with_etag(self.fs, path)
            return got if got is not None else (None, None)
        try:
            body = self.fs.cat_file(path)
        except FileNotFoundError:
            return None, None
        return body, hashlib.md5(body, usedforsecurity=False).hexdigest()

    def write_manifest(self, entries: dict[str, Entry], *, writer: dict[str, Any], expect: str | None) -> str:
        """Replace the manifest, the commit point, only if it is still the version `expect` (from
        read_manifest or the last write); return the new version's token.

        Raises MirrorFenced if another writer replaced it since. S3 checks this on the server (a
        conditional PUT); a file:// mirror under an exclusive lock (flock) beside the manifest;
        other stores by reading it just before (a narrow race between two writers remains there).
        """
        body = json.dumps({"format_version": MANIFEST_FORMAT, "writer": writer, "written": time.time(),
                           "entries": {n: e.as_dict() for n, e in sorted(entries.items())}}, indent=1).encode()
        path = self._path(MANIFEST)
        if s3_upload.supports(self.fs):
            try:
                return s3_upload.put_if(self.fs, path, body, expect)
            except s3_upload.PreconditionFailed:
                raise self._fenced() from None
        with self._manifest_lock():
            if self._read_manifest_bytes()[1] != expect:
                raise self._fenced()
            if _is_local(self.fs):  # a filesystem has rename: write aside, fsync, replace in one step
                storage.replace_file(Path(path), body)
            else:  # an object store: one PUT is atomic
                self.fs.pipe_file(path, body)
        return hashlib.md5(body, usedforsecurity=False).hexdigest()

    @contextmanager
    def _manifest_lock(self) -> Iterator[None]:
        if not _is_local(self.fs):
            yield
            return
        with open(Path(self._path(_MANIFEST_LOCK)), "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _fenced(self) -> MirrorFenced:
        try:
            who = self.writer() or {}
        except Exception:  # noqa: BLE001 - only for the message
            who = {}
        by = f"run {who.get('run')} on {who.get('host')} (pid {who.get('pid')}), since {who.get('since')}" \
            if who else "another run"
        return MirrorFenced(f"the mirror {mask(self.url)} is now written by {by}: this run stops uploading to it "
                            "and deletes nothing there (one writer per mirror prefix; the newest run owns it)")

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
                if expected.get("on_mirror"):  # uploaded and verified by the node that wrote it
                    uploaded[expected["digest"]] = self._uploaded_shard(name, expected)
                    continue
                with open_member(name) as src:
                    size = os.fstat(src.fileno()).st_size
                    key = f"objects/{expected['digest']}.shard"
                    self._upload_object(src, size, StreamDigest(size), expected["digest"], key, footer=False)
                    uploaded[expected["digest"]] = ObjectRef(key, size)
        return uploaded

    def upload_shard(self, path: Path, digest: str) -> None:
        """Upload one shard file of a sharded checkpoint whose digest is known, verified; any rank may call this.

        For nodes with disks of their own (`sharded.ShardWriter(upload=)`): each uploads the shard files
        it wrote, and the manifest that lists them is written by rank 0's mirror only after every
        node's upload has been verified.
        """
        with open(path, "rb") as src:
            size = os.fstat(src.fileno()).st_size
            self._upload_object(src, size, StreamDigest(size), digest, f"objects/{digest}.shard", footer=False)

    def _uploaded_shard(self, name: str, expected: dict[str, Any]) -> ObjectRef:
        key = f"objects/{expected['digest']}.shard"
        try:
            size = self.fs.size(self._path(key))
        except FileNotFoundError:
            size = None
        if size != expected["bytes"]:
            raise CorruptCheckpointError(f"shard file {name} was uploaded by the node that wrote it, but the mirror "
                                         f"holds {'no' if size is None else f'a {size}-byte'} object for it")
        return ObjectRef(key, expected["bytes"])

    def complete_shards(self, path: Path) -> None:
        """Download into the sharded checkpoint at `path` the shard files it lists as on the mirror and lacks.

        Each is verified against its digest and linked in under its name; afterwards the directory
        is whole here. Raises CorruptCheckpointError if the mirror does not hold one of them intact.
        """
        listed = fileformat.read_footer(path).get("shards") or {}
        missing = {name: f for name, f in listed.items() if f.get("on_mirror") and not (path / name).exists()}
        for name, f in sorted(missing.items()):
            tmp = storage.temp_path_for(path / name)
            try:
                self._download_object(f"objects/{f['digest']}.shard", tmp)
                if fileformat.hash_file(tmp) != f["digest"]:
                    raise CorruptCheckpointError(f"shard file {name} on the mirror differs from what was uploaded")
                storage.commit_temporary(tmp, path / name)
            except FileNotFoundError:
                raise CorruptCheckpointError(f"shard file {name} is on neither this disk nor the mirror") from None
            finally:
                tmp.unlink(missing_ok=True)
        if missing:
            logger.warning("%s: fetched %d shard file(s) written by other nodes from the mirror %s", path.name,
                           len(missing), mask(self.url))

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
        if _is_local(self.fs):  # the manifest's own temporaries, left by a kill during its replace
            storage.clean_temp_files(Path(self.root))
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
        if which == "latest":  # the local store's chain: this line of training, newest first, then others
            order = [e for e, _ in fallback.latest_first(list(entries.values()))]
        elif which == "best":
            order = [entries[n] for n in (layout.BEST, layout.BEST_BACKUP, layout.BEST_PREVIOUS) if n in entries]
        else:
            order = [entries[which]] if which in entries else []
        seen: set[str] = set()
        order = [e for e in order if not (e.digest in seen or seen.add(e.digest))]  # each object tried once
        if not order:
            raise NoCheckpointError(f"the mirror {mask(self.url)} holds no {which}")
        failures = []
        for entry in order:
            # Placed under the name it is kept under (latest.pt is another name's object), never under a
            # name the next save replaces: the resumed run protects it there.
            name = layout.stable_name(n for n, e in entries.items() if e.digest == entry.digest) or entry.name
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
