"""The store's policy: layout, retention, best tracking, fallback, locking and disk space."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from train_improved.checkpoint import (
    CheckpointError,
    CheckpointManager,
    CheckpointOptions,
    Kind,
    NoCheckpointError,
    storage,
)
from train_improved.checkpoint.retention import keep_last


def st(step: int) -> dict:
    w = torch.full((32, 32), float(step))
    return {"model": {"w": w, "tied": w}, "step": step}


def run(manager: CheckpointManager, steps: range, val: dict[int, float] | None = None) -> None:
    for step in steps:
        kinds = []
        if val and step in val:
            kinds.append(Kind.BEST)
        if manager.should_save(step):
            kinds.append(Kind.ROLLING)
        if kinds:
            manager.save(st(step), step=step, kinds=kinds, metrics={"val_loss": val[step]} if val and step in val else None)
    manager.wait_until_finished()


def names(d: Path) -> set[str]:
    return {p.name for p in d.iterdir() if p.suffix == ".pt"}


def test_a_kill_between_the_bests_two_renames_leaves_no_temporary_at_the_next_best(tmp_path: Path) -> None:
    """A kill after the old best was linked to best_model_previous.pt and before the new best replaced
    best_model.pt leaves the two names on one file. The next best links best_model.pt to
    best_model_previous.pt again: rename(2) between two links of one file does nothing, and the
    temporary link stayed behind until the next start (a kill -9 torture found it)."""
    d = tmp_path / "ck"
    with CheckpointManager(d, CheckpointOptions(save_every=None)) as m:
        run(m, range(1, 3), val={1: 5.0, 2: 4.0})
    (d / "best_model_previous.pt").unlink()
    os.link(d / "best_model.pt", d / "best_model_previous.pt")  # what the kill left
    with CheckpointManager(d, CheckpointOptions(save_every=None)) as m:
        run(m, range(3, 4), val={3: 3.0})
        assert not list(d.glob(".tmp-*"))  # before close: the next open would sweep it
    load = lambda n: torch.load(d / n, weights_only=True)  # noqa: E731
    assert load("best_model.pt")["step"] == 3 and load("best_model_previous.pt")["step"] == 2


def test_retention_policy_is_pure() -> None:
    assert keep_last(2)(["a", "b", "c"]) == [False, True, True]
    assert keep_last(5)(["a"]) == [True]


@pytest.mark.parametrize("async_save", [True, False])
def test_layout_after_a_run(tmp_path: Path, async_save: bool) -> None:
    d = tmp_path / "ck"
    with CheckpointManager(d, CheckpointOptions(keep_rolling=2, save_every=2, async_save=async_save)) as m:
        run(m, range(1, 11), val={3: 5.0, 6: 4.0, 9: 4.5})
        m.save(st(10), step=10, epoch=0, kinds=Kind.EPOCH)
        m.save(st(10), step=10, kinds=Kind.EMERGENCY)
        m.wait_until_finished()
    assert names(d) >= {"latest.pt", "latest_backup.pt", "rolling_step_000008.pt", "rolling_step_000010.pt",
                        "rolling_last_backup.pt", "best_model.pt", "best_model_backup.pt",
                        "best_model_previous.pt", "epoch_00000.pt"}
    assert len([n for n in names(d) if n.startswith("rolling_step_")]) == 2
    assert len([n for n in names(d) if n.startswith("emergency_step_000010_")]) == 1
    load = lambda n: torch.load(d / n, weights_only=True)  # noqa: E731
    assert load("best_model.pt")["step"] == 6 and load("best_model_previous.pt")["step"] == 3
    assert storage.read_footer(d / "best_model_previous.pt")["metrics"]["val_loss"] > 4.0
    assert load("latest.pt")["step"] == 10
    # Backups are independent copies: equal bytes, separate inodes.
    for twin, backup in (("best_model.pt", "best_model_backup.pt"), ("rolling_step_000010.pt", "rolling_last_backup.pt")):
        assert (d / twin).read_bytes() == (d / backup).read_bytes()
        assert os.stat(d / twin).st_ino != os.stat(d / backup).st_ino
    assert not list(d.glob(".tmp-*"))
    history = (d / "history.jsonl").read_text()
    assert '"event": "delete"' in history and "rolling_step_000002.pt" in history


@pytest.mark.parametrize("async_save", [True, False])
def test_keep_best_keeps_the_k_best_evaluations_by_the_metric(tmp_path: Path, async_save: bool) -> None:
    """--keep-best 2 --metric accuracy --mode max: best_step_*.pt are the two best evaluations (a tie goes to
    the earlier one), the best triple stays, and a new manager ranks what is on disk."""
    options = CheckpointOptions(keep_best=2, metric="accuracy", mode="max", save_every=None, async_save=async_save)
    accuracy = {10: 0.5, 20: 0.7, 30: 0.6, 40: 0.8, 50: 0.7, 60: 0.65}
    with CheckpointManager(tmp_path, options) as ckpt:
        for step, acc in accuracy.items():
            ckpt.save(st(step), step=step, kinds=[Kind.BEST, Kind.TOP], metrics={"accuracy": acc})
        ckpt.wait_until_finished()
        assert not ckpt.enters_top({"accuracy": 0.7}) and ckpt.enters_top({"accuracy": 0.75})
    assert sorted(n for n in names(tmp_path) if n.startswith("best_step")) == ["best_step_000020.pt",
                                                                              "best_step_000040.pt"]
    assert {"best_model.pt", "best_model_backup.pt", "best_model_previous.pt"} <= names(tmp_path)
    with CheckpointManager(tmp_path, options) as ckpt:
        ckpt.save(st(70), step=70, kinds=[Kind.TOP], metrics={"accuracy": 0.75})
        ckpt.wait_until_finished()
        assert ckpt.restore("best_step_000070.pt")[0]["step"] == 70
    assert sorted(n for n in names(tmp_path) if n.startswith("best_step")) == ["best_step_000040.pt",
                                                                              "best_step_000070.pt"]


def test_async_and_sync_saves_hold_identical_tensors(tmp_path: Path) -> None:
    state = {"model": {"w": torch.randn(100, 100)}, "opt": [torch.arange(10)], "n": 3}
    out = {}
    for mode in (True, False):
        with CheckpointManager(tmp_path / str(mode), CheckpointOptions(async_save=mode)) as m:
            m.save(state, step=1)
        out[mode] = torch.load(tmp_path / str(mode) / "rolling_step_000001.pt", weights_only=True)
    assert torch.equal(out[True]["model"]["w"], out[False]["model"]["w"])
    assert torch.equal(out[True]["opt"][0], out[False]["opt"][0])


def test_async_snapshot_is_taken_at_save_time(tmp_path: Path) -> None:
    w = torch.zeros(1000)
    with CheckpointManager(tmp_path, CheckpointOptions(async_save=True)) as m:
        m.save({"w": w}, step=1)
        w += 1  # training goes on while the writer works
    assert torch.equal(torch.load(tmp_path / "latest.pt", weights_only=True)["w"], torch.zeros(1000))


@pytest.mark.parametrize("async_save", [True, False])
def test_stall_counts_the_time_the_caller_spent_preparing(tmp_path: Path, async_save: bool) -> None:
    # The trainer first gathers the state (and stages its shards): the loop waited for that too.
    with CheckpointManager(tmp_path, CheckpointOptions(async_save=async_save)) as m:
        m.save({"w": torch.zeros(10)}, step=1, stall_before=0.25)
        (result,) = m.wait_until_finished()
    assert result.stall_s >= 0.25
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert history[-1]["stall_s"] >= 0.25


def test_a_new_manager_sees_the_same_latest_and_best(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, CheckpointOptions(save_every=2)) as m:
        run(m, range(1, 7), val={2: 3.0, 4: 2.0, 6: 2.5})
    with CheckpointManager(tmp_path, CheckpointOptions(save_every=2)) as again:
        assert again.latest().step == 6 and again.latest_step() == 6
        assert again.best().step == 4 and again.best_value == 2.0
        assert not again.is_improvement({"val_loss": 2.2}) and again.is_improvement({"val_loss": 1.9})


def test_second_writer_is_refused(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path):
        with pytest.raises(CheckpointError, match="in use by another train process"):
            CheckpointManager(tmp_path)


def test_fallback_from_damaged_latest_is_loud(tmp_path: Path, caplog) -> None:
    with CheckpointManager(tmp_path, CheckpointOptions(save_every=1)) as m:
        run(m, range(1, 4))
    latest = tmp_path / "latest.pt"
    data = latest.read_bytes()
    latest.unlink()  # break the hard link first so only latest.pt is damaged
    latest.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING), CheckpointManager(tmp_path) as m:
        state, info = m.restore("latest")
    assert state["step"] == 3 and info.name in ("rolling_step_000003.pt", "rolling_last_backup.pt")
    assert "latest.pt failed verification" in caplog.text and "instead of latest.pt" in caplog.text


def test_best_falls_back_to_backup_then_previous(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, CheckpointOptions(save_every=None)) as m:
        run(m, range(1, 3), val={1: 2.0, 2: 1.0})
    (tmp_path / "best_model.pt").write_bytes(b"garbage")
    with CheckpointManager(tmp_path) as m:
        assert m.restore("best")[1].name == "best_model_backup.pt"
    (tmp_path / "best_model_backup.pt").write_bytes(b"")
    with CheckpointManager(tmp_path) as m:
        state, info = m.restore("best")
    assert info.name == "best_model_previous.pt" and state["step"] == 1


def test_all_candidates_bad_is_a_clear_error(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, CheckpointOptions(save_every=1, keep_rolling=1)) as m:
        run(m, range(1, 3))
    for p in tmp_path.glob("*.pt"):
        p.unlink()
        p.write_bytes(b"x" * 100)
    with CheckpointManager(tmp_path) as m, pytest.raises(CheckpointError, match="no valid checkpoint"):
        m.restore("latest")


def test_empty_directory_has_nothing_to_restore(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path) as m, pytest.raises(NoCheckpointError):
        m.restore("latest")


def test_disk_error_mid_save_keeps_earlier_files_and_reports(tmp_path: Path, monkeypatch) -> None:
    with CheckpointManager(tmp_path, CheckpointOptions(save_every=1)) as m:
        run(m, range(1, 3))
        before = {p.name: p.read_bytes() for p in tmp_path.glob("*.pt")}

        def enospc(fd):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(storage.os, "fsync", enospc)
        m.save(st(3), step=3)
        results = m.wait_until_finished()
        monkeypatch.undo()
        assert results[0].error and "No space left on device" in results[0].error
        assert {p.name: p.read_bytes() for p in tmp_path.glob("*.pt")} == before
        assert not list(tmp_path.glob(".tmp-*"))
        m.save(st(4), step=4)  # the next save works again
        assert not m.wait_until_finished()[0].error
    assert torch.load(tmp_path / "latest.pt", weights_only=True)["step"] == 4


def test_low_disk_space_skips_the_save(tmp_path: Path, monkeypatch, caplog) -> None:
    with CheckpointManager(tmp_path, CheckpointOptions(min_free_bytes=10**6)) as m:
        monkeypatch.setattr(storage, "free_bytes", lambda d: 1000)
        with caplog.at_level(logging.WARNING):
            assert m.save(st(1), step=1) is False
        assert m.poll()[0].skipped
    assert "skipping this save" in caplog.text and not list(tmp_path.glob("*.pt"))


def test_resumed_file_is_never_pruned(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, CheckpointOptions(save_every=1, keep_rolling=1)) as m:
        run(m, range(1, 3))
    with CheckpointManager(tmp_path, CheckpointOptions(save_every=1, keep_rolling=1)) as m:
        m.restore("rolling_step_000002.pt")
        run(m, range(3, 6))
    assert {"rolling_step_000002.pt", "rolling_step_000005.pt"} <= names(tmp_path)
    assert "rolling_step_000004.pt" not in names(tmp_path)


def test_names_resolve_inside_the_directory(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path / "ck") as m:
        assert m.resolve("rolling_step_000001.pt") == tmp_path / "ck" / "rolling_step_000001.pt"
        assert m.resolve("../../etc/passwd") == Path("../../etc/passwd")
        with pytest.raises(CheckpointError, match="no checkpoint named nope.pt"):
            m.restore("nope.pt")


def test_a_restore_under_another_metric_or_mode_starts_best_tracking_again(tmp_path: Path) -> None:
    # The best a checkpoint records belongs to its metric and mode; under others it means nothing.
    with CheckpointManager(tmp_path, CheckpointOptions(save_every=1)) as m:
        m.save(st(1), step=1, kinds=[Kind.BEST, Kind.ROLLING], metrics={"val_loss": 1.0, "train_loss": 9.0})
    for options in (CheckpointOptions(metric="train_loss"), CheckpointOptions(mode="max")):
        with CheckpointManager(tmp_path, options) as m:
            m.restore("latest")
            assert m.best_value is None and m.is_improvement({"val_loss": 50.0, "train_loss": 50.0})
    with CheckpointManager(tmp_path) as m:  # same metric and mode: the recorded best holds
        m.restore("latest")
        assert m.best_value == 1.0 and not m.is_improvement({"val_loss": 2.0})
        m.options = CheckpointOptions(metric="train_loss")  # options given after the restore re-seed it
        assert m.best_value is None


def test_after_a_branch_latest_backup_is_the_state_it_continued(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, CheckpointOptions(save_every=1)) as m:
        for step in (1, 2, 3, 4):
            m.save(st(step), step=step)
    with CheckpointManager(tmp_path, CheckpointOptions(save_every=1)) as m:
        m.restore("rolling_step_000002.pt")  # back to step 2: the first run's steps 3 and 4 are another line
        m.save(st(3), step=3)
        m.wait_until_finished()
    assert storage.read_footer(tmp_path / "latest_backup.pt")["step"] == 2  # not the abandoned step 4


def test_retention_deletes_an_abandoned_branch_before_the_new_lines_files(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, CheckpointOptions(save_every=1, keep_rolling=3)) as m:
        for step in range(1, 11):
            m.save(st(step), step=step)  # rolling 8, 9, 10 are kept
    with CheckpointManager(tmp_path, CheckpointOptions(save_every=1, keep_rolling=2)) as m:
        m.restore("rolling_step_000008.pt")
        m.save(st(9), step=9)
        m.wait_until_finished()
    # Sorted by step alone, the new step 9 was the oldest deletable file; the abandoned step 10 goes.
    assert names(tmp_path) >= {"rolling_step_000008.pt", "rolling_step_000009.pt"}
    assert "rolling_step_000010.pt" not in names(tmp_path)


def test_storage_usage_skips_a_checkpoint_pruned_after_it_was_listed(tmp_path: Path) -> None:
    # The lister beside a running writer: retention can delete a file between the scan and the stat.
    from train_improved.checkpoint.records import disk_usage

    d = tmp_path / "ck"
    with CheckpointManager(d, CheckpointOptions(save_every=1, async_save=False)) as m:
        for step in (1, 2):
            m.save({"w": torch.full((256,), float(step))}, step=step)
    infos = CheckpointManager(d, read_only=True).all()
    (d / "rolling_step_000001.pt").unlink()
    left = {p.stat().st_ino: p.stat().st_size for p in d.glob("*.pt")}
    assert sum(disk_usage(infos).values()) == sum(left.values())
