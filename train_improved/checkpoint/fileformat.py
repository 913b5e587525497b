"""The checkpoint format and everything that reads it: footer, verification, safe loading.

A checkpoint *file* is a regular `torch.save` zip archive whose zip *comment* holds a small JSON
footer: what the file is (kind, step, metrics, args...) and the xxh3-128 digest of the archive bytes.
The footer ends with a fixed tail: its own length, an xxh3-64 of the JSON, and a magic string.
So every file describes and verifies itself. Its metadata can never drift from its contents (no
second file has to be renamed in step with it), `torch.load(path, weights_only=True)` reads it like
any checkpoint, and the footer can be read without importing torch or touching tensor data.

A *sharded* checkpoint (FSDP2, written with torch.distributed.checkpoint) is a directory with the
same final name: the DCP files (`.metadata`, `__R_0.distcp`) plus `state.pt`, a checkpoint file as
above holding everything but the sharded tensors, whose footer lists every DCP file with its size
and digest. The footer is written last, so a directory is only as complete as its `state.pt` says.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import xxhash

FORMAT_VERSION = 1
DIGEST_ALGORITHM = "xxh3_128"
FOOTER_MAGIC = b"TIMPCKPT"  # last 8 bytes of every checkpoint file
STATE_FILE = "state.pt"  # in a sharded checkpoint directory: the footer and the non-sharded state
_EOCD_SIGNATURE = b"PK\x05\x06"
_EOCD_SIZE = 22  # zip end-of-central-directory record without its comment
_TAIL = struct.Struct("<I16s8s")  # footer JSON length, xxh3-64 of the JSON (hex), magic
_MAX_COMMENT = 0xFFFF
# The payload's last bytes: the zip comment length, written with the footer after the digest was
# taken over the stream (where it was 0). Every digest check hashes them as zeros.
ZIP_COMMENT_LENGTH_BYTES = 2
_READ_CHUNK = 8 << 20
T = TypeVar("T")


class CheckpointError(Exception):
    """A problem with a checkpoint or its directory that the user can act on (one clear line)."""


class CorruptCheckpointError(CheckpointError):
    """The file is truncated, altered, empty, or not a train_improved checkpoint."""


class UnsafeCheckpointError(CheckpointError):
    """The file would need arbitrary code to unpickle; it was refused and nothing ran."""


class ShardsOnMirrorError(CorruptCheckpointError):
    """A sharded checkpoint holds only some of its shard files here (each intact); the others are on the mirror."""


class CheckpointWriteError(CheckpointError):
    """A save failed (disk full, I/O error, verification mismatch); earlier files are untouched."""


def encode_footer(meta: dict[str, Any]) -> bytes:
    body = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    footer = body + _TAIL.pack(len(body), xxhash.xxh3_64_hexdigest(body).encode(), FOOTER_MAGIC)
    if len(footer) > _MAX_COMMENT:
        raise ValueError(f"checkpoint metadata is {len(footer)} bytes; the zip comment holds {_MAX_COMMENT}")
    return footer


def state_file(path: Path) -> Path:
    """The file that carries the footer: the checkpoint itself, or `state.pt` inside a sharded one."""
    return path / STATE_FILE if path.is_dir() else path


@contextmanager
def _members(path: Path) -> Iterator[Callable[[str], BinaryIO]]:
    """Opens the files of one checkpoint by name (a plain file is its own only member).

    A directory is opened once and its files relative to it, so every file read comes from the
    same checkpoint even if the name is swapped for a newer one meanwhile (a lister running
    beside training).
    """
    if not path.is_dir():
        yield lambda name: open(path, "rb")
        return
    dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield lambda name: open(name, "rb", opener=lambda n, flags: os.open(n, flags, dir_fd=dir_fd))
    except CorruptCheckpointError:
        try:
            moved = os.stat(path).st_ino != os.fstat(dir_fd).st_ino
        except FileNotFoundError:
            moved = True
        if moved:  # a writer replaced this checkpoint while it was read: not damage
            raise _ReplacedWhileReading from None
        raise
    finally:
        os.close(dir_fd)


class _ReplacedWhileReading(Exception):
    pass


def _read_consistently(path: Path, read: Callable[[Callable[[str], BinaryIO]], T]) -> T:
    """`read(open_member)` over one checkpoint's files; again if a writer replaced it meanwhile."""
    for _ in range(5):
        try:
            with _members(path) as open_member:
                return read(open_member)
        except _ReplacedWhileReading:
            continue
    raise CorruptCheckpointError("was replaced by newer checkpoints five times while being read")


def _open_state(open_member: Callable[[str], BinaryIO], sharded: bool) -> BinaryIO:
    try:
        return open_member(STATE_FILE)
    except FileNotFoundError:
        if sharded:
            raise CorruptCheckpointError(f"directory without {STATE_FILE} (not a checkpoint, or an incomplete "
                                         "sharded one)") from None
        raise


def read_footer(path: Path) -> dict[str, Any]:
    """The footer of a checkpoint, reading only its last bytes. Raises CorruptCheckpointError."""
    def read(open_member: Callable[[str], BinaryIO]) -> dict[str, Any]:
        with _open_state(open_member, path.is_dir()) as f:
            return _read_footer(f, os.fstat(f.fileno()).st_size)

    try:
        return _read_consistently(path, read)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {describe_os_error(e)}") from e


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


def hash_file(path: Path) -> str:
    """xxh3-128 of a whole file."""
    with open(path, "rb") as f:
        return _hash_open(f, os.fstat(f.fileno()).st_size)


def _hash_open(f: BinaryIO, length: int, tail: bytes = b"") -> str:
    """xxh3-128 of the first `length` bytes of an open file, then `tail`."""
    digest = StreamDigest(length, tail)
    f.seek(0)
    remaining = length
    while remaining > 0 and (chunk := f.read(min(_READ_CHUNK, remaining))):
        digest.update(chunk)
        remaining -= len(chunk)
    return digest.hexdigest()  # raises if the file ended before `length` bytes


class StreamDigest:
    """A file's digest taken from its bytes as they stream past once (an upload), as verify_file takes it.

    Feed every byte of the file, in order, to update(). `of_checkpoint(footer)` for a checkpoint file
    (the footer's convention), `StreamDigest(size)` for a whole file (a shard).
    """

    def __init__(self, length: int, tail: bytes = b"") -> None:
        self._hasher, self._left, self._tail = xxhash.xxh3_128(), length, tail

    @classmethod
    def of_checkpoint(cls, meta: dict[str, Any]) -> StreamDigest:
        return cls(meta["payload_bytes"] - ZIP_COMMENT_LENGTH_BYTES, bytes(ZIP_COMMENT_LENGTH_BYTES))

    def update(self, chunk: bytes | memoryview) -> None:
        if self._left > 0:
            view = memoryview(chunk)[:self._left]
            self._hasher.update(view)
            self._left -= len(view)

    def hexdigest(self) -> str:
        if self._left:
            raise CorruptCheckpointError("file is shorter than its footer says (truncated?)")
        hasher = self._hasher.copy()
        hasher.update(self._tail)
        return hasher.hexdigest()


def verify_file(path: Path, expected_digest: str | None = None, *, shards: bool = True) -> dict[str, Any]:
    """Read the whole checkpoint back and check its digests; return its footer.

    For a sharded checkpoint, `shards=False` checks `state.pt` only (a rank that loads a directory
    rank 0 has just verified). Raises CorruptCheckpointError.
    """
    try:
        return _read_consistently(path, lambda m: _verify(m, path.is_dir(), expected_digest, shards))
    except OSError as e:
        raise CorruptCheckpointError(f"cannot be read back: {describe_os_error(e)}") from e


def verify_stream(f: BinaryIO, size: int, expected_digest: str | None = None) -> dict[str, Any]:
    """Check one open checkpoint file of `size` bytes (a local file or a remote stream) against its footer.

    Returns the footer; raises CorruptCheckpointError if the bytes do not match its digest (or
    `expected_digest`).
    """
    meta = _read_footer(f, size)
    actual = _hash_open(f, meta["payload_bytes"] - ZIP_COMMENT_LENGTH_BYTES, tail=bytes(ZIP_COMMENT_LENGTH_BYTES))
    return _check_digest(meta, actual, expected_digest)


def check_read_back(f: BinaryIO, size: int, read_back_digest: str, expected_digest: str) -> dict[str, Any]:
    """`verify_stream` for a file whose payload was already read back and hashed (as it was written).

    Reads and checks only the footer; returns it. Raises CorruptCheckpointError.
    """
    return _check_digest(_read_footer(f, size), read_back_digest, expected_digest)


def _check_digest(meta: dict[str, Any], actual: str, expected_digest: str | None) -> dict[str, Any]:
    if actual != meta["digest"]:
        raise CorruptCheckpointError(f"checksum mismatch (stored {meta['digest'][:12]}…, actual {actual[:12]}…)")
    if expected_digest is not None and actual != expected_digest:
        raise CorruptCheckpointError("read-back digest differs from the digest computed while writing")
    return meta


def _verify(open_member: Callable[[str], BinaryIO], sharded: bool, expected_digest: str | None,
            shards: bool) -> dict[str, Any]:
    with _open_state(open_member, sharded) as f:
        meta = verify_stream(f, os.fstat(f.fileno()).st_size, expected_digest)
    if sharded and shards:
        _verify_shards(open_member, meta)
    return meta


def _verify_shards(open_member: Callable[[str], BinaryIO], meta: dict[str, Any]) -> None:
    """Check every DCP file the footer lists: present, same size, same digest."""
    listed = meta.get("shards")
    if not isinstance(listed, dict) or not listed:
        raise CorruptCheckpointError(f"{STATE_FILE} lists no shard files (damaged footer)")
    on_mirror = []
    for name, expected in sorted(listed.items()):
        try:
            f = open_member(name)  # one at a time: a checkpoint of many ranks lists many files
        except FileNotFoundError:
            if expected.get("on_mirror"):
                on_mirror.append(name)
                continue
            raise CorruptCheckpointError(f"shard file {name} is missing") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            if size != expected["bytes"]:
                raise CorruptCheckpointError(f"shard file {name} is {size} bytes, {expected['bytes']} were "
                                             "written (truncated?)")
            if _hash_open(f, size) != expected["digest"]:
                raise CorruptCheckpointError(f"shard file {name}: checksum mismatch")
    if on_mirror:  # every file here checks out; the others are on the mirror
        raise ShardsOnMirrorError(
            f"holds {len(listed) - len(on_mirror)} of its {len(listed)} shard files here; the other {len(on_mirror)} "
            "were uploaded to the mirror by the nodes that wrote them (a resume or an export with --mirror fetches "
            "them)")


def load_checkpoint(path: Path, map_location: Any = "cpu", *, shards: bool = True,
                    safe_globals: list[Any] | None = None, verify: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify, then load with `weights_only=True` only. Returns (state, footer).

    For a sharded checkpoint this loads `state.pt` (everything but the sharded tensors, which
    `sharded.read_shards` loads on every rank). A payload that needs arbitrary code to unpickle
    raises UnsafeCheckpointError; there is no fallback to unsafe loading. `safe_globals` are
    classes the caller deliberately allows (`torch.serialization.safe_globals`). `verify=False`
    skips the digest check, for a caller that has just made it (the lister's --verify).
    """
    import pickle

    import torch

    sharded = path.is_dir()

    def read(open_member: Callable[[str], BinaryIO]) -> tuple[Any, dict[str, Any]]:
        if verify:
            meta = _verify(open_member, sharded, None, shards)
        else:
            with _open_state(open_member, sharded) as f:
                meta = _read_footer(f, os.fstat(f.fileno()).st_size)
        with _open_state(open_member, sharded) as f, torch.serialization.safe_globals(list(safe_globals or [])):
            return torch.load(f, map_location=map_location, weights_only=True), meta

    try:
        state, meta = _read_consistently(path, read)
    except pickle.UnpicklingError as e:
        reason = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line),
                      str(e).splitlines()[-1].strip() if str(e) else "")
        raise UnsafeCheckpointError(
            f"needs arbitrary code to unpickle and was refused (weights_only=True): {reason[:200]}"
        ) from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise CorruptCheckpointError(f"torch could not read it: {str(e).splitlines()[0][:200]}") from None
    except OSError as e:
        raise CorruptCheckpointError(f"cannot be read back: {describe_os_error(e)}") from e
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"holds a {type(state).__name__}, not a checkpoint dict")
    return state, meta


def checkpoint_size(path: Path) -> int:
    """Bytes of a checkpoint: the file, or every file of a sharded directory."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return path.stat().st_size


def describe_os_error(e: OSError) -> str:
    name = errno.errorcode.get(e.errno or 0, "")
    text = e.strerror or str(e)
    return f"{text} ({name})" if name else text
