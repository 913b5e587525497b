"""The crash-safe write, the footer, verification and secure loading (train_improved.checkpoint.storage)."""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from train_improved.checkpoint import fileformat, storage, stream
from train_improved.checkpoint.fileformat import (
    CheckpointWriteError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    load_checkpoint,
    read_footer,
    verify_file,
)
from train_improved.checkpoint.storage import write_checkpoint


def state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(64, 64, generator=g)}, "step": seed, "args": {"lr": 0.1}}


def temp_files(d: Path) -> list[Path]:
    return list(d.glob(f"{storage.TEMP_PREFIX}*"))


def test_written_file_loads_with_plain_torch_and_carries_its_footer(tmp_path: Path) -> None:
    path = tmp_path / "a.pt"
    footer = write_checkpoint(path, state(1), {"step": 1, "kind": "rolling"})
    loaded = torch.load(path, weights_only=True)  # what a user with only torch does
    assert torch.equal(loaded["model"]["w"], state(1)["model"]["w"])
    assert read_footer(path) == footer
    assert footer["step"] == 1 and footer["algorithm"] == "xxh3_128"
    assert verify_file(path)["digest"] == footer["digest"]
    assert not temp_files(tmp_path)


@pytest.mark.parametrize("phase", ["serialize", "write", "fsync", "verify", "rename", "fsync_dir"])
def test_failure_at_each_write_phase_leaves_old_file_identical_and_no_temp(tmp_path: Path, monkeypatch, phase) -> None:
    path = tmp_path / "latest.pt"
    write_checkpoint(path, state(1), {"step": 1})
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    def stored_differently(fd: int, data: memoryview) -> None:  # the disk keeps other bytes than were sent
        real_write_all(fd, bytes([data[0] ^ 0xFF]) + bytes(data[1:]))

    real_write_all = stream._write_all
    target = {"serialize": (torch, "save"), "write": (os, "write"), "fsync": (os, "fsync"), "rename": (os, "replace"),
              "fsync_dir": (storage, "fsync_dir"), "verify": (stream, "_write_all")}[phase]
    monkeypatch.setattr(*target, stored_differently if phase == "verify" else boom)
    with pytest.raises(CheckpointWriteError) as err:
        write_checkpoint(path, state(2), {"step": 2})
    assert "latest.pt" in str(err.value)
    monkeypatch.undo()
    if phase == "fsync_dir":
        # The rename itself happened: the new file is complete and verified, only its durability is unknown.
        assert verify_file(path)["step"] in (1, 2)
    else:
        assert path.read_bytes() == before
    assert not temp_files(tmp_path)


def test_a_backup_that_reads_back_differently_fails_the_save_before_any_rename(tmp_path: Path, monkeypatch) -> None:
    # The file and its backup are written in one pass and read back beside the writes (stream.py): a byte
    # that reaches only the backup's pages wrongly, 20 MiB in (the third read-back range), is caught.
    path, backup = tmp_path / "latest.pt", tmp_path / "latest_backup.pt"
    real_write_all = stream._write_all
    offsets: dict[int, int] = {}  # per descriptor, in the order written: the file's, then the backup's

    def damage_the_backup(fd: int, data: memoryview) -> None:
        start = offsets.setdefault(fd, 0)
        offsets[fd] = start + len(data)
        if fd == list(offsets)[-1] and len(offsets) == 2 and start <= 20 << 20 < start + len(data):
            damaged = bytearray(data)
            damaged[(20 << 20) - start] ^= 0x01
            data = memoryview(damaged)
        real_write_all(fd, data)

    monkeypatch.setattr(stream, "_write_all", damage_the_backup)
    big = {"w": torch.arange(8 << 20, dtype=torch.float32)}  # 32 MiB
    with pytest.raises(CheckpointWriteError, match="did not verify"):
        write_checkpoint(path, big, {"step": 1}, copies=[backup])
    assert not path.exists() and not backup.exists() and not temp_files(tmp_path)


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncate_half", "truncate_tail", "flip_header", "flip_tensor", "flip_footer",
                                    "empty", "foreign_text", "foreign_torch"])
def test_damaged_or_foreign_files_are_detected(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "x.pt"
    write_checkpoint(path, state(3), {"step": 3})
    size = path.stat().st_size
    footer_len = len(path.read_bytes()) - read_footer(path)["payload_bytes"]
    if damage == "truncate_half":
        os.truncate(path, size // 2)
    elif damage == "truncate_tail":
        os.truncate(path, size - 5)
    elif damage == "flip_header":
        flip(path, 10)
    elif damage == "flip_tensor":
        flip(path, size // 2)
    elif damage == "flip_footer":
        flip(path, size - footer_len + 5)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "foreign_text":
        path.write_text("hello, I am not a checkpoint\n" * 10)
    elif damage == "foreign_torch":
        torch.save({"w": torch.ones(3)}, path)
    with pytest.raises(CorruptCheckpointError):
        load_checkpoint(path)


def test_directory_instead_of_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "d.pt").mkdir()
    with pytest.raises(CorruptCheckpointError, match="directory"):
        load_checkpoint(tmp_path / "d.pt")


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {Payload.marker}",))


def forge(path: Path, obj: object, step: int = 1) -> None:
    """A malicious pickle wearing a valid footer: the digest passes, so only weights_only stands guard."""
    import io
    import json

    import xxhash

    buf = io.BytesIO()
    torch.save(obj, buf, pickle_protocol=2)
    payload = buf.getvalue()
    meta = {"digest": xxhash.xxh3_128(payload).hexdigest(), "payload_bytes": len(payload), "step": step,
            "format_version": 1, "args": {"lr": 1.0}}
    body = json.dumps(meta).encode()
    footer = body + struct.pack("<I16s8s", len(body), xxhash.xxh3_64_hexdigest(body).encode(), fileformat.FOOTER_MAGIC)
    path.write_bytes(payload[:-2] + struct.pack("<H", len(footer)) + footer)


def test_hostile_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    Payload.marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    forge(path, {"x": Payload()})
    verify_file(path)  # the forgery is internally consistent...
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        load_checkpoint(path)  # ...and still refused
    assert not Payload.marker.exists()


def test_plain_pickle_without_footer_is_never_unpickled(tmp_path: Path) -> None:
    Payload.marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CorruptCheckpointError):
        load_checkpoint(path)
    assert not Payload.marker.exists()


def test_stale_temp_files_are_cleaned(tmp_path: Path) -> None:
    stale = storage.temp_path_for(tmp_path / "latest.pt")
    stale.write_bytes(b"half a checkpoint")
    assert storage.clean_temp_files(tmp_path) == [stale]
    assert not stale.exists()


def test_a_file_larger_than_the_writeback_chunk_is_written_whole(tmp_path: Path, monkeypatch) -> None:
    # Files over 32 MiB are handed to the disk in chunks while torch.save still runs (sync_file_range).
    calls = []
    real = stream.start_writeback

    def spy(fd: int, off: int, n: int) -> None:
        calls.append((off, n))
        real(fd, off, n)

    monkeypatch.setattr(stream, "start_writeback", spy)
    big = {"w": torch.arange(12 << 20, dtype=torch.float32)}  # 48 MiB
    path = tmp_path / "big.pt"
    write_checkpoint(path, big, {"step": 1}, copies=[tmp_path / "big_backup.pt"])
    assert len(calls) >= 2 and all(off + n <= path.stat().st_size for off, n in calls)  # both files, in range
    for p in (path, tmp_path / "big_backup.pt"):
        assert torch.equal(load_checkpoint(p)[0]["w"], big["w"])


def test_the_zip_crc32_is_skipped_and_our_digest_still_catches_a_flipped_tensor_byte(tmp_path: Path) -> None:
    # torch.load never checks the zip CRC-32 (most of torch.save's CPU time): the store skips it,
    # restores torch's setting afterwards, and relies on its own digest, which every load checks.
    from torch.utils.serialization import config

    path = tmp_path / "a.pt"
    big = {"w": torch.arange(1 << 20, dtype=torch.float32)}
    write_checkpoint(path, big, {"step": 1})
    assert config.save.compute_crc32 is True
    with zipfile.ZipFile(path) as z:
        assert {i.CRC for i in z.infolist()} == {0}
        assert z.testzip() is not None  # what `unzip -t` sees; torch.load does not look
    assert torch.equal(torch.load(path, weights_only=True)["w"], big["w"])
    flip(path, path.stat().st_size // 2)  # inside the tensor's bytes
    assert torch.load(path, weights_only=True)["w"].ne(big["w"]).any()  # plain torch does not notice...
    with pytest.raises(CorruptCheckpointError):
        load_checkpoint(path)  # ...the store does


def test_concurrent_saves_leave_torchs_crc32_setting_as_they_found_it() -> None:
    from torch.utils.serialization import config

    for before in (False, True):
        config.save.compute_crc32 = before
        first, second = stream.zip_crc32_skipped(), stream.zip_crc32_skipped()
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)
        assert config.save.compute_crc32 is False  # the second save is still writing
        second.__exit__(None, None, None)
        assert config.save.compute_crc32 is before
