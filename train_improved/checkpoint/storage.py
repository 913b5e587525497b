"""Crash-safe file primitives: the only module that calls fsync, os.replace and os.link.

A checkpoint file is a regular `torch.save` zip archive whose zip *comment* holds a small JSON
footer: what the file is (kind, step, metrics, args...) and the xxh3-128 digest of the archive bytes.
The footer ends with a fixed tail: its own length, an xxh3-64 of the JSON, and a magic string.
So every file describes and verifies itself. Its metadata can never drift from its contents (no
second file has to be renamed in step with it), `torch.load(path, weights_only=True)` reads it like
any checkpoint, and the footer can be read without importing torch or touching tensor data.

Write sequence (`write_checkpoint`): temporary name in the same directory -> stream `torch.save`
through a hashing writer -> attach footer -> flush -> fsync -> read back and compare digest ->
rename -> fsync directory. Any failure removes the temporary file and raises `CheckpointWriteError`.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import struct
from pathlib import Path
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, BinaryIO

import xxhash

FORMAT_VERSION = 1
DIGEST_ALGORITHM = "xxh3_128"
FOOTER_MAGIC = b"TIMPCKPT"  # last 8 bytes of every checkpoint file
TEMP_PREFIX = ".tmp-"  # temporary files never carry a final name, and are hidden from `ls`
_EOCD_SIGNATURE = b"PK\x05\x06"
_EOCD_SIZE = 22  # zip end-of-central-directory record without its comment
_TAIL = struct.Struct("<I16s8s")  # footer JSON length, xxh3-64 of the JSON (hex), magic
_MAX_COMMENT = 0xFFFF
_READ_CHUNK = 8 << 20


class CheckpointError(Exception):
    """A problem with a checkpoint or its directory that the user can act on (one clear line)."""


class CorruptCheckpointError(CheckpointError):
    """The file is truncated, altered, empty, or not a train_improved checkpoint."""


class UnsafeCheckpointError(CheckpointError):
    """The file would need arbitrary code to unpickle; it was refused and nothing ran."""


class CheckpointWriteError(CheckpointError):
    """A save failed (disk full, I/O error, verification mismatch); earlier files are untouched."""


def temp_path_for(final: Path) -> Path:
    return final.with_name(f"{TEMP_PREFIX}{final.name}.{os.getpid()}.{secrets.token_hex(4)}")


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    # Only used to clean our own temporary file while another error is already propagating.
    try:
        path.unlink()
    except FileNotFoundError:
        pass


class _HashingWriter:
    """File-like sink for torch.save that hashes every byte on its way to one or more files."""

    def __init__(self, raws: Sequence[BinaryIO]) -> None:
        self.raws = raws
        self.hasher = xxhash.xxh3_128()
        self.bytes_written = 0

    def write(self, data: bytes | memoryview) -> int:
        self.hasher.update(data)
        for raw in self.raws:
            n = raw.write(data)
        self.bytes_written += n
        return n

    def flush(self) -> None:
        for raw in self.raws:
            raw.flush()


def _encode_footer(meta: dict[str, Any]) -> bytes:
    body = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    footer = body + _TAIL.pack(len(body), xxhash.xxh3_64_hexdigest(body).encode(), FOOTER_MAGIC)
    if len(footer) > _MAX_COMMENT:
        raise ValueError(f"checkpoint metadata is {len(footer)} bytes; the zip comment holds {_MAX_COMMENT}")
    return footer


def _hash_payload(f: BinaryIO, payload_bytes: int) -> str:
    """xxh3-128 of the archive as torch.save wrote it, i.e. with a zero-length zip comment."""
    hasher = xxhash.xxh3_128()
    f.seek(0)
    remaining = payload_bytes - 2  # the comment-length field was 0 when the digest was taken
    while remaining > 0:
        chunk = f.read(min(_READ_CHUNK, remaining))
        if not chunk:
            raise CorruptCheckpointError("file is shorter than its footer says (truncated?)")
        hasher.update(chunk)
        remaining -= len(chunk)
    hasher.update(b"\x00\x00")
    return hasher.hexdigest()


_NO_HARD_LINKS = (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP)


@contextmanager
def _temporary_for(final: Path, action: str) -> Iterator[Path]:
    """A temporary path beside `final`; on any failure it is removed and the error says what failed."""
    tmp = temp_path_for(final)
    try:
        yield tmp
    except BaseException as e:
        _unlink_quietly(tmp)
        if isinstance(e, OSError):
            raise CheckpointWriteError(f"could not {action}: {_describe_os_error(e)}") from e
        if isinstance(e, CorruptCheckpointError):
            raise CheckpointWriteError(f"{final.name} did not verify after writing: {e}") from e
        raise


def write_checkpoint(
    final: Path, obj: Any, meta: dict[str, Any], before_commit: Callable[[], None] | None = None,
    *, verify: bool = True, copies: Sequence[Path] = (),
) -> dict[str, Any]:
    """Atomically write `obj` (torch.save) to `final` with `meta` in its footer; return the footer.

    The footer gets `format_version`, `digest`, `algorithm` and `payload_bytes` added. `copies` are
    independent files (their own inodes) with the same bytes, written in the same pass (serializing
    once is much cheaper than copying the file afterwards) and committed right after `final`.
    `before_commit` runs after every new file is durable and verified, just before `final` takes
    its name (the store uses it to move the old best aside only once the new best is safe).
    `verify=False` skips only the read-back (for an emergency save against a deadline); the digest
    is still in the footer and every load checks it. On any error every temporary file is removed,
    no final name is touched before its own file is complete, and `CheckpointWriteError` is raised.
    """
    import torch  # deferred: the lister and the footer readers must not pay for importing torch

    targets = [final, *copies]
    with ExitStack() as stack:
        tmps = [stack.enter_context(_temporary_for(t, f"write {t.name}")) for t in targets]
        with ExitStack() as files:
            raws = [files.enter_context(open(tmp, "xb")) for tmp in tmps]
            writer = _HashingWriter(raws)
            torch.save(obj, writer)
            payload = writer.bytes_written
            footer_meta = dict(meta, format_version=FORMAT_VERSION, algorithm=DIGEST_ALGORITHM,
                               digest=writer.hasher.hexdigest(), payload_bytes=payload)
            footer = _encode_footer(footer_meta)
            for raw in raws:
                raw.seek(payload - 2)
                raw.write(struct.pack("<H", len(footer)))  # the zip comment now covers the footer
                raw.write(footer)
                raw.flush()
                # After a failed fsync Linux may drop the dirty pages: the file is abandoned, never retried.
                os.fsync(raw.fileno())
        if verify:
            for tmp in tmps:
                verify_file(tmp, expected_digest=footer_meta["digest"])
        if before_commit is not None:
            before_commit()
        for tmp, target in zip(tmps, targets, strict=True):
            os.replace(tmp, target)
            fsync_dir(target.parent)
    return footer_meta


def copy_checkpoint(src: Path, final: Path) -> dict[str, Any]:
    """Atomically make `final` an independent copy (its own inode) of `src`, verified like a write."""
    with _temporary_for(final, f"copy {src.name} to {final.name}") as tmp:
        shutil.copyfile(src, tmp)  # sendfile/copy_file_range on Linux: no Python-level buffer
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        footer = verify_file(tmp, expected_digest=read_footer(src)["digest"])
        os.replace(tmp, final)
        fsync_dir(final.parent)
    return footer


def link_checkpoint(src: Path, final: Path) -> None:
    """Make `final` name the same bytes as `src`: a hard link where possible, else a verified copy.

    Used for names whose content must equal another file's but which are not backups (latest).
    """
    with _temporary_for(final, f"link {src.name} to {final.name}") as tmp:
        try:
            os.link(src, tmp)
        except OSError as e:
            if e.errno not in _NO_HARD_LINKS:
                raise
        else:
            os.replace(tmp, final)
            fsync_dir(final.parent)
            return
    copy_checkpoint(src, final)  # this filesystem has no hard links


def remove(path: Path) -> None:
    path.unlink()


def read_footer(path: Path) -> dict[str, Any]:
    """The footer of a checkpoint file, reading only its last bytes. Raises CorruptCheckpointError."""
    try:
        with open(path, "rb") as f:
            return _read_footer(f, os.fstat(f.fileno()).st_size)
    except IsADirectoryError:
        raise CorruptCheckpointError("is a directory, not a checkpoint file") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {_describe_os_error(e)}") from e


def _read_footer(f: BinaryIO, size: int) -> dict[str, Any]:
    if size == 0:
        raise CorruptCheckpointError("file is empty")
    if size < _EOCD_SIZE + _TAIL.size:
        raise CorruptCheckpointError(f"file is only {size} bytes (truncated, or not a checkpoint)")
    f.seek(size - _TAIL.size)
    body_len, body_digest, magic = _TAIL.unpack(f.read(_TAIL.size))
    if magic != FOOTER_MAGIC:
        raise CorruptCheckpointError("no train_improved footer (truncated, or not a train_improved checkpoint)")
    footer_len = body_len + _TAIL.size
    payload = size - footer_len
    if body_len > _MAX_COMMENT or payload < _EOCD_SIZE:
        raise CorruptCheckpointError("footer length is out of range (damaged footer)")
    f.seek(payload - _EOCD_SIZE)
    eocd = f.read(_EOCD_SIZE)
    if eocd[:4] != _EOCD_SIGNATURE or struct.unpack("<H", eocd[-2:])[0] != footer_len:
        raise CorruptCheckpointError("zip end record does not match the footer (damaged or truncated)")
    body = f.read(body_len)
    if xxhash.xxh3_64_hexdigest(body).encode() != body_digest:
        raise CorruptCheckpointError("footer metadata checksum mismatch (damaged footer)")
    try:
        meta = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CorruptCheckpointError("footer metadata is not valid JSON (damaged footer)") from None
    if not isinstance(meta, dict) or meta.get("payload_bytes") != payload or "digest" not in meta:
        raise CorruptCheckpointError("footer metadata is inconsistent with the file size (damaged)")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint format {meta['format_version']} is newer than this train_improved "
            f"(reads up to {FORMAT_VERSION}); upgrade train_improved"
        )
    return meta


def verify_file(path: Path, expected_digest: str | None = None) -> dict[str, Any]:
    """Read the whole file back and check its digest; return its footer. Raises CorruptCheckpointError."""
    try:
        with open(path, "rb") as f:
            meta = _read_footer(f, os.fstat(f.fileno()).st_size)
            actual = _hash_payload(f, meta["payload_bytes"])
    except IsADirectoryError:
        raise CorruptCheckpointError("is a directory, not a checkpoint file") from None
    except OSError as e:
        raise CorruptCheckpointError(f"cannot be read back: {_describe_os_error(e)}") from e
    if actual != meta["digest"]:
        raise CorruptCheckpointError(f"checksum mismatch (stored {meta['digest'][:12]}…, actual {actual[:12]}…)")
    if expected_digest is not None and actual != expected_digest:
        raise CorruptCheckpointError("read-back digest differs from the digest computed while writing")
    return meta


def load_checkpoint(path: Path, map_location: Any = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify, then load with `weights_only=True` only. Returns (state, footer).

    A payload that needs arbitrary code to unpickle raises UnsafeCheckpointError; there is no
    fallback to unsafe loading.
    """
    import pickle

    import torch

    meta = verify_file(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line),
                      str(e).splitlines()[-1].strip() if str(e) else "")
        raise UnsafeCheckpointError(
            f"needs arbitrary code to unpickle and was refused (weights_only=True): {reason[:200]}"
        ) from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise CorruptCheckpointError(f"torch could not read it: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"holds a {type(state).__name__}, not a checkpoint dict")
    return state, meta


def clean_temp_files(directory: Path) -> list[Path]:
    """Remove temporary files left by a crashed writer. Call only while holding the directory lock."""
    removed = []
    for p in directory.glob(f"{TEMP_PREFIX}*"):
        if p.is_file():
            p.unlink()
            removed.append(p)
    return removed


def free_bytes(directory: Path) -> int:
    return shutil.disk_usage(directory).free


def append_line(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line durably (the history log)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _describe_os_error(e: OSError) -> str:
    name = errno.errorcode.get(e.errno or 0, "")
    text = e.strerror or str(e)
    return f"{text} ({name})" if name else text
