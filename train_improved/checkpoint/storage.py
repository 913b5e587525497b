"""Crash-safe write primitives: the only module that calls fsync, os.replace and os.link.

Write sequence (`write_checkpoint`): temporary name in the same directory -> stream `torch.save`
through the write pipeline (`stream`: hashed, written, and read back as it goes) -> attach footer
-> fsync -> compare the read-back digest -> rename -> fsync directory. Any failure removes the temporary file and raises `CheckpointWriteError`.
The format itself (footer, digests, safe loading) lives in `fileformat`.

A sharded checkpoint is a directory (see `fileformat`): its DCP files are already written and
fsynced by every rank into a staging directory; here they are hard-linked (or copied, for a
backup) into a temporary directory, `state.pt` is written beside them, and the directory takes
its final name in one rename, so a directory at a final name is as complete as a file.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import secrets
import shutil
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fileformat import (
    DIGEST_ALGORITHM,
    FORMAT_VERSION,
    STATE_FILE,
    ZIP_COMMENT_LENGTH_BYTES,
    CheckpointWriteError,
    CorruptCheckpointError,
    check_read_back,
    describe_os_error,
    encode_footer,
    hash_file,
    read_footer,
    verify_file,
)
from .stream import StreamWriter, libc_function, zip_crc32_skipped

TEMP_PREFIX = ".tmp-"  # temporary files never carry a final name, and are hidden from `ls`
_NO_HARD_LINKS = (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP)


@dataclass(frozen=True)
class Shards:
    """DCP files written (and fsynced) by every rank into `directory`, with their sizes and digests.

    A file whose entry says `"on_mirror": True` is not in `directory`: the node that wrote it, on a
    disk of its own, uploaded it to the mirror and verified it there (`sharded.ShardWriter(upload=)`).
    """

    directory: Path
    files: dict[str, dict[str, Any]]  # name -> {"bytes": int, "digest": str[, "on_mirror": True]}

    @property
    def bytes(self) -> int:
        return sum(f["bytes"] for f in self.files.values())


@dataclass(frozen=True)
class PendingShards:
    """Shards that every rank is still writing in the background; `wait()` returns them once durable.

    `wait()` raises CheckpointWriteError if any rank failed. `expected_bytes` is an estimate for the
    free-space check, made before the sizes are known.
    """

    directory: Path
    expected_bytes: int
    future: Future[Shards]

    def wait(self) -> Shards:
        return self.future.result()


def temp_path_for(final: Path) -> Path:
    return final.with_name(f"{TEMP_PREFIX}{final.name}.{os.getpid()}.{secrets.token_hex(4)}")


def fsync(fd: int) -> None:
    """Make a file's data durable. On macOS `fsync` only reaches the drive's cache: F_FULLFSYNC flushes it."""
    if hasattr(fcntl, "F_FULLFSYNC"):
        try:
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            return
        except OSError:
            pass  # a filesystem without it (some network mounts): plain fsync, as python-atomicwrites does
    os.fsync(fd)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """Delete a checkpoint: a file (one atomic unlink), or a sharded directory.

    A directory is first renamed to a temporary name: deleting its files one by one is not atomic,
    and a crash half-way must leave a temporary name (removed at the next open), never a
    half-deleted checkpoint under a final name.
    """
    if path.is_dir() and not path.is_symlink():
        if not path.name.startswith(TEMP_PREFIX):
            aside = temp_path_for(path)
            os.rename(path, aside)
            fsync_dir(path.parent)
            path = aside
        shutil.rmtree(path)
    else:
        path.unlink()


def _remove_quietly(path: Path) -> None:
    # Only used to clean our own temporary file while another error is already propagating.
    try:
        remove(path)
    except FileNotFoundError:
        pass


@contextmanager
def _temporary_for(final: Path, action: str) -> Iterator[Path]:
    """A temporary path beside `final`; on any failure it is removed and the error says what failed."""
    tmp = temp_path_for(final)
    try:
        yield tmp
    except BaseException as e:
        _remove_quietly(tmp)
        if isinstance(e, OSError):
            raise CheckpointWriteError(f"could not {action}: {describe_os_error(e)}") from e
        if isinstance(e, CorruptCheckpointError):
            raise CheckpointWriteError(f"{final.name} did not verify after writing: {e}") from e
        raise


def write_checkpoint(
    final: Path, obj: Any, meta: dict[str, Any],
    *, verify: bool = True, copies: Sequence[Path] = (), shards: Shards | None = None,
    displaced: list[Path] | None = None,
) -> dict[str, Any]:
    """Atomically write `obj` (torch.save) to `final` with `meta` in its footer; return the footer.

    The footer gets `format_version`, `digest`, `algorithm` and `payload_bytes` added. `copies` are
    independent files (their own inodes) with the same bytes, written in the same pass (serializing
    once is much cheaper than copying the file afterwards) and committed right after `final`.
    With `shards`, `final` and each copy become directories: the DCP files (hard links into
    `final`, real copies into each copy) plus `obj` as `state.pt`, whose footer lists the shards.
    `verify=False` skips only the read-back (for an emergency save against a deadline); the digest
    is still in the footer and every load checks it. `displaced`: see `_replace`. On any error
    every temporary file is removed, no final name is touched before its own file is complete,
    and `CheckpointWriteError` is raised.
    """
    import torch  # deferred: the lister and the footer readers must not pay for importing torch

    targets = [final, *copies]
    if shards is not None:
        meta = dict(meta, shards=shards.files)
    with ExitStack() as stack:
        tmps = [stack.enter_context(_temporary_for(t, f"write {t.name}")) for t in targets]
        if shards is not None:
            for i, tmp in enumerate(tmps):
                _fill_with_shards(tmp, shards, copy=i > 0, verify=verify)
        files = [tmp / STATE_FILE if shards is not None else tmp for tmp in tmps]
        with ExitStack() as opened:
            fds = [os.open(f, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666) for f in files]
            for fd in fds:
                opened.callback(os.close, fd)
            writer = StreamWriter(fds, read_back=verify)
            try:
                with zip_crc32_skipped():
                    torch.save(obj, writer)
                payload, digest = writer.close()
                footer_meta = dict(meta, format_version=FORMAT_VERSION, algorithm=DIGEST_ALGORITHM,
                                   digest=digest, payload_bytes=payload)
                footer = encode_footer(footer_meta)
                # The zip comment (its length is the payload's last bytes) now covers the footer.
                tail = struct.pack("<H", len(footer)) + footer
                for fd in fds:
                    os.pwrite(fd, tail, payload - ZIP_COMMENT_LENGTH_BYTES)
                    # After a failed fsync Linux may drop the dirty pages: the file is abandoned, never retried.
                    fsync(fd)
                if verify:
                    read_back = writer.read_back_digest()
                    for fd in fds:
                        with open(fd, "rb", closefd=False) as f:
                            check_read_back(f, payload + len(footer), read_back, digest)
            except BaseException:
                writer.abandon()
                raise
        if shards is not None:
            for tmp in tmps:
                fsync_dir(tmp)
        for tmp, target in zip(tmps, targets, strict=True):
            _replace(tmp, target, displaced)
            fsync_dir(target.parent)
    return footer_meta


def _fill_with_shards(tmp: Path, shards: Shards, *, copy: bool, verify: bool) -> None:
    tmp.mkdir()
    for name, expected in shards.files.items():
        if expected.get("on_mirror"):
            continue  # listed in the footer, held by the mirror
        src, dst = shards.directory / name, tmp / name
        if copy:
            _copy_durably(src, dst)
            if verify and hash_file(dst) != expected["digest"]:
                raise CorruptCheckpointError(f"the copy of shard file {name} differs from the original")
        else:
            _link_or_copy(src, dst)


def _copy_durably(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)  # sendfile/copy_file_range on Linux: no Python-level buffer
    with open(dst, "rb+") as f:
        fsync(f.fileno())


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
            raise
        _copy_durably(src, dst)  # this filesystem has no hard links


def _replace(tmp: Path, final: Path, displaced: list[Path] | None = None) -> None:
    """Give `tmp` the name `final`, atomically where the platform allows.

    A file replaces a file in one rename. A directory cannot be renamed over a non-empty one, so
    on Linux the two are swapped atomically (renameat2 RENAME_EXCHANGE) and the old one removed.
    Elsewhere the old one is first renamed aside: a crash between the two renames leaves no
    `final`, and the store's fallback finds the newest valid checkpoint instead.

    With `displaced`, the old content is not deleted but kept under a temporary name appended to
    it: dropping the last link to a large file frees its pages, ~0.2 s per GB here, which the
    caller can do after the commit. A crash leaves only a temporary name, removed at the next open.
    """
    old_dir = final.exists() and (tmp.is_dir() or final.is_dir())
    if not old_dir:
        if final.exists() and os.path.samefile(tmp, final):
            # Two links of one file (a kill between the best's two renames left best_model.pt and
            # best_model_previous.pt so): rename(2) does nothing then and would leave `tmp` behind.
            os.unlink(tmp)
            return
        if displaced is not None and final.exists():
            aside = temp_path_for(final)
            try:
                os.link(final, aside)
                displaced.append(aside)
            except OSError as e:
                if e.errno not in _NO_HARD_LINKS:
                    raise  # without hard links the rename below deletes the old file at once
        os.replace(tmp, final)
        return
    if not _exchange(tmp, final):
        aside = temp_path_for(final)
        os.rename(final, aside)
        os.rename(tmp, final)
        tmp = aside
    # after the swap, the temporary name holds the old checkpoint
    if displaced is not None:
        displaced.append(tmp)
    else:
        remove(tmp)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


_renameat2 = libc_function("renameat2")  # None: not Linux, or a libc older than 2.28


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where that is not available."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # this kernel or filesystem cannot exchange
    raise OSError(err, os.strerror(err), str(b))


def _mirror_directory(src: Path, dst: Path, put: Callable[[Path, Path], None]) -> None:
    """Make `dst` a new directory holding each file of `src`, put there by `put` (a copy or a link)."""
    dst.mkdir()
    for f in sorted(src.iterdir()):
        put(f, dst / f.name)
    fsync_dir(dst)


def link_to_temporary(src: Path, final: Path) -> Path:
    """A temporary name beside `final` for the same bytes as `src`: hard links, else a verified copy.

    A sharded checkpoint becomes a directory of hard links to the same files. `commit_temporary`
    then gives it its name; until then no final name has changed.
    """
    with _temporary_for(final, f"link {src.name} to {final.name}") as tmp:
        try:
            if src.is_dir():
                _mirror_directory(src, tmp, os.link)
            else:
                os.link(src, tmp)
            return tmp
        except OSError as e:
            if e.errno not in _NO_HARD_LINKS:
                raise
            _remove_quietly(tmp)
        # this filesystem has no hard links: an independent copy, verified like a write
        if src.is_dir():
            _mirror_directory(src, tmp, _copy_durably)
        else:
            _copy_durably(src, tmp)
        verify_file(tmp, expected_digest=read_footer(src)["digest"])
        return tmp


def commit_temporary(tmp: Path, final: Path, displaced: list[Path] | None = None) -> None:
    """Give a temporary from `link_to_temporary` its final name, durably. `displaced`: see `_replace`."""
    try:
        _replace(tmp, final, displaced)
        fsync_dir(final.parent)
    except OSError as e:
        _remove_quietly(tmp)
        raise CheckpointWriteError(f"could not rename to {final.name}: {describe_os_error(e)}") from e


def link_checkpoint(src: Path, final: Path, displaced: list[Path] | None = None) -> None:
    """Make `final` name the same bytes as `src` (latest.pt): see `link_to_temporary`."""
    commit_temporary(link_to_temporary(src, final), final, displaced)


def clean_temp_files(directory: Path, keep: frozenset[Path] | set[Path] = frozenset()) -> list[Path]:
    """Remove temporary files and directories left by a crashed writer, except the live ones in `keep`.

    Call only while holding the lock.
    """
    removed = []
    for p in directory.glob(f"{TEMP_PREFIX}*"):
        if p in keep:
            continue
        if p.is_file() or p.is_dir():
            remove(p)
            removed.append(p)
    return removed


def free_bytes(directory: Path) -> int:
    return shutil.disk_usage(directory).free


def append_line(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line durably (the history log)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        fsync(f.fileno())


def replace_file(final: Path, data: bytes) -> None:
    """Atomically give `final` the content `data`: temporary file, fsync, rename, fsync the directory."""
    with _temporary_for(final, f"write {final.name}") as tmp:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)


def yield_cpu_to_training() -> None:
    """Lower the calling thread's CPU priority (the save writer, the mirror's uploader): training should win the cores."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)  # Linux: this thread only
    except (AttributeError, OSError):
        pass  # not Linux, or not permitted: the writer just runs at normal priority
