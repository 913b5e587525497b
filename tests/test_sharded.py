"""Sharded checkpoints (directories written with torch.distributed.checkpoint) in the store, one process.

The collective parts run in one process here (DCP without a process group); the 2-rank FSDP2 runs
are in test_distributed.py.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from train_improved.checkpoint import (
    CheckpointManager,
    CheckpointOptions,
    CorruptCheckpointError,
    Kind,
    UnsafeCheckpointError,
    describe,
    fileformat,
    storage,
    verify_file,
)
from train_improved.checkpoint.sharded import (
    ShardWriter,
    load_model_state,
    read_shards,
    write_shards,
)


def tensors(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"model": {"w": torch.randn(64, 64, generator=g), "b": torch.randn(64, generator=g)},
            "optimizer_state": {"w.exp_avg": torch.randn(64, 64, generator=g)}}


def save(m: CheckpointManager, step: int, kinds: list[Kind], metrics: dict | None = None) -> None:
    shards = write_shards(m.staging_directory(), tensors(step))
    m.save({"step": step, "sharded": True, "rest": torch.tensor([step])}, step=step, kinds=kinds,
           metrics=metrics, shards=shards)


def saved_steps(d: Path, *steps: int) -> Path:
    with CheckpointManager(d) as m:
        for step in steps:
            save(m, step, [Kind.ROLLING])
        m.wait_until_finished()
    return d


def test_sharded_save_makes_directories_under_the_usual_names(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    with CheckpointManager(d, CheckpointOptions(keep_rolling=2)) as m:
        for step in (1, 2, 3):
            save(m, step, [Kind.ROLLING, Kind.BEST], {"val_loss": 10.0 - step})
        m.wait_until_finished()
        infos = {i.name: i for i in m.all()}
    assert set(infos) == {"latest.pt", "latest_backup.pt", "rolling_step_000002.pt", "rolling_step_000003.pt",
                          "rolling_last_backup.pt", "best_model.pt", "best_model_backup.pt", "best_model_previous.pt"}
    assert all(i.ok and i.path.is_dir() for i in infos.values())
    assert not list(d.glob(".tmp-*"))  # the staging directories are gone
    latest = d / "latest.pt"
    assert {p.name for p in latest.iterdir()} >= {"state.pt", ".metadata"}
    # latest.pt is hard links to the newest checkpoint; the backups are independent copies.
    newest = d / infos["latest.pt"].meta["name"]  # best_model.pt or rolling_step_000003.pt: same step
    assert newest.name in ("best_model.pt", "rolling_step_000003.pt")
    for f in newest.iterdir():
        assert (latest / f.name).stat().st_ino == f.stat().st_ino
        assert (d / "rolling_last_backup.pt" / f.name).stat().st_ino != f.stat().st_ino
    assert infos["latest.pt"].step == 3 and infos["latest_backup.pt"].step == 2
    assert infos["best_model_previous.pt"].step == 2
    # storage accounting counts hard-linked directories once
    with CheckpointManager(d, read_only=True) as m:
        usage = sum(m.usage_by_family().values())
    distinct = {f.stat().st_ino: f.stat().st_size for p in d.glob("*.pt") for f in p.iterdir()}
    assert usage == sum(distinct.values())


def test_sharded_restore_loads_every_tensor_back(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    with CheckpointManager(d) as m:
        save(m, 7, [Kind.ROLLING])
        m.wait_until_finished()
        state, info = m.restore("latest")
    assert state["step"] == 7 and info.path == d / "latest.pt"
    target = {k: {n: torch.zeros_like(t) for n, t in v.items()} for k, v in tensors(0).items()}
    read_shards(info.path, target)
    assert all(torch.equal(target[k][n], tensors(7)[k][n]) for k in target for n in target[k])
    model = load_model_state(info.path)
    assert set(model) == {"w", "b"} and torch.equal(model["w"], tensors(7)["model"]["w"])


@pytest.mark.parametrize("damage", ["flip_shard", "truncate_shard", "delete_metadata", "delete_state"])
def test_damaged_sharded_latest_falls_back_to_the_previous(tmp_path: Path, damage: str) -> None:
    d = saved_steps(tmp_path / "ck", 1, 2)
    # Damage every name of step 2 (latest.pt and rolling_step_000002.pt share their files).
    target = d / "rolling_step_000002.pt"
    shard = next(target.glob("*.distcp"))
    if damage == "flip_shard":
        with open(shard, "r+b") as f:
            f.seek(shard.stat().st_size // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif damage == "truncate_shard":
        os.truncate(shard, shard.stat().st_size // 2)
    else:
        name = ".metadata" if damage == "delete_metadata" else "state.pt"
        (target / name).unlink()
        (d / "latest.pt" / name).unlink()
    with pytest.raises(CorruptCheckpointError):
        verify_file(d / "latest.pt")
    with CheckpointManager(d) as m:
        state, info = m.restore("latest")
    # The independent backup of step 2 beats latest_backup.pt at step 1.
    assert state["step"] == 2 and info.name == "rolling_last_backup.pt"


class Payload:
    marker: Path

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_dcp_metadata_is_refused_and_never_runs(tmp_path: Path) -> None:
    d = saved_steps(tmp_path / "ck", 1)
    Payload.marker = tmp_path / "pwned"
    (d / "latest.pt" / ".metadata").unlink()
    (d / "latest.pt" / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        read_shards(d / "latest.pt", tensors(0))
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        load_model_state(d / "latest.pt")
    assert not Payload.marker.exists()


def test_pickled_objects_are_never_written_or_read_as_shards(tmp_path: Path) -> None:
    staging = tmp_path / "s"
    write_shards(staging, {"model": {"w": torch.ones(2)}, "note": {"x": "a python object"}})
    with pytest.raises(UnsafeCheckpointError, match="weights_only=False"):
        read_shards(staging, {"model": {"w": torch.zeros(2)}, "note": {"x": ""}})


def test_a_directory_without_state_is_reported_not_loaded(tmp_path: Path) -> None:
    (tmp_path / "rolling_step_000001.pt").mkdir()
    info = describe(tmp_path / "rolling_step_000001.pt")
    assert not info.ok and "state.pt" in (info.error or "")


def test_verifying_a_directory_while_the_writer_replaces_it_reads_one_checkpoint(tmp_path: Path, monkeypatch) -> None:
    # `train --list-checkpoints --verify` beside a running --fsdp job: latest_backup.pt is swapped
    # for a newer checkpoint (and the old one deleted) between reading state.pt and the shards.
    # That is not damage: the reader notices the name now holds another directory and reads that.
    d = saved_steps(tmp_path / "ck", 1, 2)
    staging = d / ".tmp-next"
    storage.link_checkpoint(d / "rolling_step_000002.pt", staging)
    real = fileformat._hash_open
    swapped = []

    def hash_then_swap(*args, **kwargs):
        digest = real(*args, **kwargs)
        if not swapped:  # after state.pt, before the shards: the writer commits step 2 over latest_backup
            storage._replace(staging, d / "latest_backup.pt")
            swapped.append(True)
        return digest

    monkeypatch.setattr(fileformat, "_hash_open", hash_then_swap)
    assert verify_file(d / "latest_backup.pt")["step"] == 2
    assert swapped


def test_a_crash_while_deleting_a_sharded_checkpoint_never_leaves_half_of_it_under_its_name(
        tmp_path: Path, monkeypatch) -> None:
    # Retention deletes whole directories; a kill between two unlinks must not leave a final-named
    # directory with some shard files missing (found by the kill -9 test of a 2-rank --fsdp run).
    d = saved_steps(tmp_path / "ck", 1, 2)
    real_rmtree = storage.shutil.rmtree

    def killed_half_way(path, *a, **k):
        next(Path(path).glob("*.distcp")).unlink()
        raise KeyboardInterrupt  # stands for the SIGKILL: nothing after this line runs

    monkeypatch.setattr(storage.shutil, "rmtree", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        storage.remove(d / "rolling_step_000001.pt")
    monkeypatch.setattr(storage.shutil, "rmtree", real_rmtree)
    assert not (d / "rolling_step_000001.pt").exists()
    for p in d.glob("*.pt"):
        verify_file(p)
    with CheckpointManager(d):  # the next writing open removes the leftover
        assert not list(d.glob(".tmp-*"))


def test_without_an_atomic_exchange_directories_are_still_replaced_whole(tmp_path: Path, monkeypatch) -> None:
    # Not Linux (no renameat2): latest.pt is renamed aside, then the new directory takes its name.
    monkeypatch.setattr(storage, "_renameat2", None)
    d = saved_steps(tmp_path / "ck", 1, 2, 3)
    with CheckpointManager(d, read_only=True) as m:
        infos = {i.name: i for i in m.all()}
        state, info = m.restore("latest")
    assert infos["latest.pt"].step == 3 and infos["latest_backup.pt"].step == 2
    assert state["step"] == 3 and info.name == "latest.pt"
    assert all(verify_file(i.path) for i in infos.values())
    assert not list(d.glob(".tmp-*"))


# One process: DCP warns from its writer thread that it saves without a process group (our intent).
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_shards_written_in_the_background_are_committed_and_restored(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    writer = ShardWriter()
    try:
        with CheckpointManager(d, CheckpointOptions(keep_rolling=2)) as m:
            for step in (1, 2, 3):
                pending = writer.start(m.staging_directory(), tensors(step))
                m.save({"step": step, "sharded": True}, step=step, kinds=[Kind.ROLLING], shards=pending)
            results = m.wait_until_finished()
            state, info = m.restore("latest")
    finally:
        writer.close()
    assert [r.error for r in results] == [None, None, None] and all(r.write_s > 0 for r in results)
    assert state["step"] == 3 and verify_file(info.path)
    assert {p.name for p in d.glob("*.pt")} == {"latest.pt", "latest_backup.pt", "rolling_step_000002.pt",
                                                "rolling_step_000003.pt", "rolling_last_backup.pt"}
    assert not list(d.glob(".tmp-*"))  # every staging directory is gone
    target = {k: {n: torch.zeros_like(t) for n, t in v.items()} for k, v in tensors(0).items()}
    read_shards(info.path, target)
    assert all(torch.equal(target[k][n], tensors(3)[k][n]) for k in target for n in target[k])


# One process: DCP warns from its writer thread that it saves without a process group (our intent).
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_failed_background_shard_write_is_reported_and_latest_stays(tmp_path: Path) -> None:
    d = saved_steps(tmp_path / "ck", 1)
    (tmp_path / "a_file").write_text("not a directory")
    writer = ShardWriter()
    try:
        with CheckpointManager(d) as m:
            pending = writer.start(tmp_path / "a_file" / "shards", tensors(2))  # DCP cannot create it
            m.save({"step": 2, "sharded": True}, step=2, kinds=[Kind.ROLLING], shards=pending)
            (result,) = m.wait_until_finished()
            assert m.latest().step == 1
    finally:
        writer.close()
    assert result.error is not None and "writing the shards failed: Not a directory (ENOTDIR)" in result.error
    assert not (d / "rolling_step_000002.pt").exists()
    assert verify_file(d / "latest.pt")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_mirror_entry_lists_a_sharded_checkpoints_files_even_after_retention_removed_it(tmp_path: Path) -> None:
    # The uploader lists the store, uploads, then writes entries: retention may remove a directory in between.
    # Its entry must still name every shard object (read from the footer), or the bucket would list state.pt alone.
    from train_improved.checkpoint.inventory import ObjectRef
    from train_improved.checkpoint.mirror import _entry
    from train_improved.checkpoint.records import scan

    d = saved_steps(tmp_path / "ck", 1)
    (info,) = [i for i in scan(d) if i.name == "rolling_step_000001.pt"]
    up = {info.meta["digest"]: ObjectRef(f"objects/{info.meta['digest']}.pt", 1)}
    up.update({f["digest"]: ObjectRef(f"objects/{f['digest']}.shard", f["bytes"]) for f in info.meta["shards"].values()})
    storage.remove(info.path)
    entry = _entry(info, up)
    assert entry is not None and set(entry.files or {}) == set(info.meta["shards"])
