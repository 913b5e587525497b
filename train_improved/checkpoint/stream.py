"""The write path behind every checkpoint file: hash and write as torch.save streams, and read back beside it.

`torch.save` hands its bytes to `StreamWriter.write`, which hashes them and writes them to each
file, asking the kernel every 32 MiB to start writing to disk (`start_writeback`). A read-back
thread follows the writes through the files: every 8 MiB range, once written, is mapped and hashed
again. After the last write, the read-back would add ~0.2 s per GiB of every file to the save;
beside the writes it ends with them (benchmarks/README.md, issue 25).

The read-back sees what the kernel holds for the file, as a read-back after the fsync did; its
digest is compared once every byte is written, before anything is renamed (`storage.write_checkpoint`).
A writer thread of its own (torch.save's bytes copied into reused buffers) was measured too, and
lost: see benchmarks/README.md.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import xxhash

from .fileformat import ZIP_COMMENT_LENGTH_BYTES, CorruptCheckpointError

_READ_BACK_CHUNK = 8 << 20  # a multiple of the page size: every range but the last is mapped at such an offset
_WRITEBACK_CHUNK = 32 << 20
_SYNC_FILE_RANGE_WRITE = 2


def libc_function(name: str) -> Any:
    """A libc function by name (with errno), or None where this platform has none (not Linux, old libc)."""
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (AttributeError, OSError):
        return None


_sync_file_range = libc_function("sync_file_range")  # None: the final fsync does all the work
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range to disk now, without waiting (Linux sync_file_range).

    While torch.save produces the rest of the file, the disk is already busy with what came
    before, so the final fsync finds little left to do (RocksDB's bytes_per_sync does the same).
    This is only a hint: durability still comes from the fsync.
    """
    global _sync_file_range
    if _sync_file_range is None:
        return
    if _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE) != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOSYS, errno.ESPIPE, errno.ENOTSUP, errno.EOPNOTSUPP):
            _sync_file_range = None  # this platform or filesystem does not take the hint
            return
        raise OSError(err, os.strerror(err))


_zip_crc_lock = threading.Lock()
_zip_crc_savers = 0
_zip_crc_setting = True


@contextmanager
def zip_crc32_skipped() -> Iterator[None]:
    """While it is open, torch.save skips the zip format's CRC-32 of each record it writes.

    That CRC-32 was 0.32 s of torch.save's 0.33 s per GiB (benchmarks/README.md, issue 25), yet
    torch.load never checks it (a flipped byte loads without error), while every checkpoint carries
    our own digest of all its bytes, checked on every load. Torch keeps the setting process-wide:
    the first of concurrent saves turns it off, the last one out restores what it was, so a
    torch.save of the caller's own that runs meanwhile writes CRC-32 zeros too (`unzip -t` would
    flag them; torch.load is unaffected).
    """
    from torch.utils.serialization import config  # deferred: torch is imported only by the write path

    global _zip_crc_savers, _zip_crc_setting
    with _zip_crc_lock:
        if _zip_crc_savers == 0:
            _zip_crc_setting = config.save.compute_crc32
            config.save.compute_crc32 = False
        _zip_crc_savers += 1
    try:
        yield
    finally:
        with _zip_crc_lock:
            _zip_crc_savers -= 1
            if _zip_crc_savers == 0:
                config.save.compute_crc32 = _zip_crc_setting


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data):]


class StreamWriter:
    """File-like sink for torch.save that writes the same bytes to every file in `fds` (open read-write).

    `close()` returns (bytes written, xxh3-128 of them). With `read_back`, `read_back_digest()`
    then waits for the read-back and returns the digest of what the files hold, by the footer's
    convention (the zip comment length hashed as zeros). An error of the read-back is raised by
    `write`, `close` or `read_back_digest`; call `abandon()` when the save fails elsewhere.
    """

    def __init__(self, fds: Sequence[int], *, read_back: bool) -> None:
        self._fds = list(fds)
        self._hasher = xxhash.xxh3_128()
        self._written = 0  # bytes in every file so far: the read-back follows this
        self._handed_to_disk = 0
        self._done = False
        self._error: BaseException | None = None
        self._progress = threading.Condition()
        self._digests: list[str] | None = None
        self._reader: threading.Thread | None = None
        if read_back:
            self._reader = threading.Thread(target=self._read_back, name="checkpoint-read-back", daemon=True)
            self._reader.start()

    def write(self, data: bytes | memoryview) -> int:
        self._raise_if_failed()
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        self._hasher.update(view)
        for fd in self._fds:
            _write_all(fd, view)
        with self._progress:
            self._written += len(view)
            self._progress.notify_all()
        if self._written - self._handed_to_disk >= _WRITEBACK_CHUNK:
            for fd in self._fds:
                start_writeback(fd, self._handed_to_disk, self._written - self._handed_to_disk)
            self._handed_to_disk = self._written
        return len(view)

    def flush(self) -> None:
        pass  # every write() went straight to the files

    def close(self) -> tuple[int, str]:
        """The stream has ended: return (bytes written, digest); the read-back reads its last range."""
        with self._progress:
            self._done = True
            self._progress.notify_all()
        self._raise_if_failed()
        return self._written, self._hasher.hexdigest()

    def read_back_digest(self) -> str:
        """The digest of the files as read back (all files must agree); after close()."""
        assert self._reader is not None, "created without read_back"
        self._reader.join()
        self._raise_if_failed()
        assert self._digests is not None
        if len(set(self._digests)) != 1:
            raise CorruptCheckpointError("the files written in one pass read back differently")
        return self._digests[0]

    def abandon(self) -> None:
        """Stop the read-back after a failure elsewhere (the caller removes the files)."""
        with self._progress:
            self._error = self._error or _Abandoned()
            self._progress.notify_all()
        if self._reader is not None:
            self._reader.join()

    def _raise_if_failed(self) -> None:
        if self._error is not None and not isinstance(self._error, _Abandoned):
            raise self._error

    def _read_back(self) -> None:
        hashers = [xxhash.xxh3_128() for _ in self._fds]
        read = 0
        # The payload's last bytes (the zip comment length) are rewritten with the footer: never read
        # them here; they are hashed as zeros, as when the digest was taken.
        hold_back = ZIP_COMMENT_LENGTH_BYTES
        try:
            while True:
                with self._progress:
                    while (self._error is None and not self._done
                           and self._written - hold_back < read + _READ_BACK_CHUNK):
                        self._progress.wait()
                    if self._error is not None:
                        return
                    done = self._done
                    end = self._written - hold_back
                    if not done:  # whole chunks only until the end: each is mapped at an aligned offset
                        end = read + (end - read) // _READ_BACK_CHUNK * _READ_BACK_CHUNK
                while read < end:
                    n = min(_READ_BACK_CHUNK, end - read)
                    for fd, hasher in zip(self._fds, hashers, strict=True):
                        # Mapped, the page cache is hashed where it lies: half the cost of copying it out.
                        with mmap.mmap(fd, n, offset=read, prot=mmap.PROT_READ) as pages:
                            hasher.update(pages)
                    read += n
                if done:
                    for hasher in hashers:
                        hasher.update(bytes(hold_back))
                    self._digests = [h.hexdigest() for h in hashers]
                    return
        except BaseException as e:
            with self._progress:
                self._error = self._error or e
                self._progress.notify_all()


class _Abandoned(Exception):
    pass
