"""The bucket after a recovery (issue 21): the manifest is the mirror's own inventory, one writer per prefix.

Planning is tested as pure functions; the uploader against a file:// mirror and moto's S3 server in
this process (a subprocess proves nothing more there); the whole recovery story with real `train`
processes, kill -9 and the local directory deleted, in tests/test_mirror.py's style.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from pathlib import Path

import pytest
import torch

from train_improved.checkpoint import CheckpointError, CheckpointManager, CheckpointOptions, Kind, layout
from train_improved.checkpoint.inventory import Entry, Retention, plan_manifest
from train_improved.checkpoint.mirror import Mirror
from train_improved.checkpoint.remote import MirrorError, RemoteStore


def entry(name: str, step: int, digest: str, kind: str = "rolling", run: str = "a", t: int | None = None,
          ancestry: list | None = None) -> Entry:
    saved = f"2026-11-30T00:{(t if t is not None else step) // 60:02d}:{(t if t is not None else step) % 60:02d}+00:00"
    return Entry(name, f"objects/{digest}.pt", digest, 100, step, kind, saved,
                 lineage={"run": run, "ancestry": ancestry or []})


def bucket_after_a_run() -> dict[str, Entry]:
    """What the mirror of a run holds at step 40: rolling 32-40, emergency 12, epochs 0-2, the best triple."""
    out = {n: entry(n, s, f"r{s}") for n, s in [("rolling_step_000032.pt", 32), ("rolling_step_000036.pt", 36),
                                                  ("rolling_step_000040.pt", 40)]}
    out["emergency_step_000012_20261130_000012.pt"] = entry("emergency_step_000012_20261130_000012.pt", 12, "e12",
                                                            "emergency")
    for epoch, step in enumerate((12, 24, 36)):
        out[layout.epoch_name(epoch)] = entry(layout.epoch_name(epoch), step, f"p{step}", "epoch")
    out[layout.BEST] = entry(layout.BEST, 30, "b30", "best")
    out[layout.BEST_BACKUP] = entry(layout.BEST_BACKUP, 30, "b30", "best")
    out[layout.BEST_PREVIOUS] = entry(layout.BEST_PREVIOUS, 20, "b20", "best")
    out[layout.LATEST] = out["rolling_step_000040.pt"].renamed(layout.LATEST)
    out[layout.LATEST_BACKUP] = out["rolling_step_000036.pt"].renamed(layout.LATEST_BACKUP)
    out[layout.ROLLING_BACKUP] = out["rolling_step_000040.pt"].renamed(layout.ROLLING_BACKUP)
    return out


def test_a_new_machine_holding_one_downloaded_file_keeps_everything_the_policies_keep() -> None:
    remote = bucket_after_a_run()
    local = {"rolling_step_000040.pt": remote["rolling_step_000040.pt"]}  # all a new machine has
    assert plan_manifest(local, remote, Retention(keep_rolling=3, keep_emergency=2)) == remote
    assert plan_manifest({}, remote, Retention(keep_rolling=3, keep_emergency=2)) == remote  # a run over a populated prefix


def test_the_k_best_are_ranked_over_both_tiers() -> None:
    """--keep-best 2: a new machine's better evaluation displaces the bucket's worse one, never a better one."""
    def top(step: int, acc: float) -> Entry:
        return dataclasses.replace(entry(layout.top_name(step), step, f"t{step}", "top"), metrics={"accuracy": acc})

    remote = {**bucket_after_a_run(), **{e.name: e for e in (top(10, 0.7), top(20, 0.9))}}
    local = {e.name: e for e in (top(44, 0.8),)}
    plan = plan_manifest(local, remote, Retention(keep_rolling=3, keep_emergency=2, keep_best=2, metric="accuracy",
                                                  mode="max"))
    assert sorted(n for n in plan if n.startswith("best_step")) == ["best_step_000020.pt", "best_step_000044.pt"]
    assert plan_manifest({}, remote, Retention(keep_best=2, metric="accuracy", mode="max")) == remote


def test_the_resumed_run_rotates_the_bucket_as_an_uninterrupted_run_would() -> None:
    remote = bucket_after_a_run()
    resumed = [("a", 40)]  # run b continues run a at step 40
    new = {n: entry(n, s, f"n{s}", k, run="b", t=100 + s, ancestry=resumed)
           for n, s, k in [("rolling_step_000044.pt", 44, "rolling"), ("rolling_step_000048.pt", 48, "rolling"),
                           (layout.BEST, 46, "best"), (layout.BEST_BACKUP, 46, "best"), (layout.LATEST, 48, "rolling"),
                           (layout.LATEST_BACKUP, 44, "rolling"), (layout.ROLLING_BACKUP, 48, "rolling"),
                           (layout.epoch_name(3), 48, "epoch")]}
    new[layout.LATEST] = new["rolling_step_000048.pt"].renamed(layout.LATEST)
    new[layout.ROLLING_BACKUP] = new["rolling_step_000048.pt"].renamed(layout.ROLLING_BACKUP)
    new[layout.LATEST_BACKUP] = new["rolling_step_000044.pt"].renamed(layout.LATEST_BACKUP)
    new[layout.BEST_BACKUP] = new[layout.BEST].renamed(layout.BEST_BACKUP)
    plan = plan_manifest(new, remote, Retention(keep_rolling=3, keep_emergency=2))
    assert sorted(n for n in plan if n.startswith("rolling_step")) == [
        "rolling_step_000040.pt", "rolling_step_000044.pt", "rolling_step_000048.pt"]
    assert [plan[layout.epoch_name(e)].step for e in range(4)] == [12, 24, 36, 48]  # epochs are kept forever
    assert plan["emergency_step_000012_20261130_000012.pt"] == remote["emergency_step_000012_20261130_000012.pt"]
    assert (plan[layout.BEST].digest, plan[layout.BEST_BACKUP].digest, plan[layout.BEST_PREVIOUS].digest) == \
        ("n46", "n46", "b30")  # the old best (only on the bucket) became the previous one
    assert plan[layout.LATEST].digest == "n48" and plan[layout.LATEST_BACKUP].digest == "n44"


def test_a_resumed_run_that_never_beats_the_best_keeps_the_buckets_best_triple() -> None:
    remote = bucket_after_a_run()
    first = {layout.LATEST: entry(layout.LATEST, 44, "n44", run="b", t=144, ancestry=[("a", 40)]),
             "rolling_step_000044.pt": entry("rolling_step_000044.pt", 44, "n44", run="b", t=144, ancestry=[("a", 40)])}
    plan = plan_manifest(first, remote, Retention(keep_rolling=3, keep_emergency=2))
    assert {n: plan[n].digest for n in (layout.BEST, layout.BEST_BACKUP, layout.BEST_PREVIOUS)} == \
        {layout.BEST: "b30", layout.BEST_BACKUP: "b30", layout.BEST_PREVIOUS: "b20"}
    assert plan[layout.LATEST_BACKUP].digest == "r40"  # the state it resumed from, as latest.pt rotates locally
    assert "rolling_step_000032.pt" not in plan  # keep-last-3 over both tiers: 36, 40, 44


def test_a_downloaded_checkpoint_is_named_where_no_save_overwrites_it() -> None:
    assert layout.stable_name([layout.LATEST, layout.ROLLING_BACKUP, "rolling_step_000024.pt"]) == \
        "rolling_step_000024.pt"
    assert layout.stable_name([layout.BEST_BACKUP, layout.BEST]) == layout.BEST
    assert layout.stable_name([layout.LATEST, layout.LATEST_BACKUP]) is None


def test_a_manifest_entry_with_keys_from_a_newer_version_is_read_and_a_newer_format_refused(tmp_path: Path) -> None:
    root = tmp_path / "mirror"
    remote = RemoteStore.open(f"file://{root}")
    body = {"format_version": 2, "entries": {"latest.pt": {**entry("latest.pt", 4, "d4").as_dict(), "future": 1}}}
    (root / "manifest.json").write_text(json.dumps(body))
    assert remote.manifest()["latest.pt"].step == 4
    (root / "manifest.json").write_text(json.dumps({**body, "format_version": 3}))
    with pytest.raises(MirrorError, match="format 3, newer than this train_improved reads"):
        remote.manifest()


# ---------------------------------------------------------------------- the uploader, in this process


def save_steps(d: Path, steps: range, *, resume: bool = False, epochs: bool = True, remote: RemoteStore | None = None,
               best_every: int = 2) -> CheckpointManager:
    """Saves like the trainer's: rolling every step, an epoch every 3, a best every `best_every`."""
    m = CheckpointManager(d, CheckpointOptions(save_every=1, keep_rolling=2, keep_emergency=2))
    if resume:
        m.restore("latest")
    if remote is not None:
        m.attach_mirror(remote)
    for step in steps:
        kinds = [Kind.ROLLING] + ([Kind.EPOCH] if epochs and step % 3 == 0 else []) + \
            ([Kind.BEST] if step % best_every == 0 else [])
        m.save({"w": torch.full((256,), float(step)), "step": step}, step=step, epoch=step // 3, kinds=kinds,
               metrics={"val_loss": 10.0 - step})
        m.wait_until_finished()
    return m


def test_machine_loss_through_the_api_keeps_the_buckets_history_and_the_resumed_from_file(tmp_path: Path) -> None:
    remote = RemoteStore.open(f"file://{tmp_path / 'mirror'}")
    first = save_steps(tmp_path / "a", range(1, 12), remote=remote)
    first.close(mirror_wait=60)
    before = remote.manifest()
    assert {layout.epoch_name(e) for e in (1, 2, 3)} <= set(before)
    # The machine is gone: a new one downloads latest and trains on.
    new = tmp_path / "b"
    path = remote.fetch("latest", new)
    assert path.name == "rolling_step_000011.pt"  # never rolling_last_backup.pt, which the next save replaces
    m = CheckpointManager(new, CheckpointOptions(save_every=1, keep_rolling=2, keep_emergency=2))
    state, info = m.restore("latest")
    assert state["step"] == 11 and info.name == path.name
    m.attach_mirror(remote)
    assert m.mirror.request(wait=60)
    assert remote.manifest() == {n: e for n, e in before.items()}  # the first sync deleted nothing
    for step in (12, 13):  # no new best: val_loss is worse than the bucket's best
        m.save({"w": torch.full((256,), float(step)), "step": step}, step=step, kinds=[Kind.ROLLING])
        m.wait_until_finished()
    m.close(mirror_wait=60)
    after = remote.manifest()
    assert (new / path.name).exists()  # the resumed-from file survived the resumed run's saves
    assert {layout.epoch_name(e) for e in (1, 2, 3)} <= set(after)  # keep-forever epochs are still there
    assert after[layout.BEST] == before[layout.BEST] and after[layout.BEST_PREVIOUS] == before[layout.BEST_PREVIOUS]
    assert after[layout.LATEST].step == 13 and after[layout.LATEST_BACKUP].step == 12
    for e in after.values():
        remote.verify_entry(e)
    objects = {p.name for p in (tmp_path / "mirror" / "objects").iterdir()}
    assert objects == {e.key.split("/")[1] for e in after.values()}  # nothing unlisted, nothing missing


def test_every_sync_reaches_the_mirror_events(tmp_path: Path) -> None:
    remote = RemoteStore.open(f"file://{tmp_path / 'mirror'}")
    m = save_steps(tmp_path / "ck", range(1, 2), remote=remote, epochs=False)
    assert m.mirror.request(wait=60)
    assert m.mirror_events()[-1]["mirrored_step"] == 1
    save_steps_more = [2, 3]
    for step in save_steps_more:
        m.save({"w": torch.zeros(4), "step": step}, step=step)
        m.wait_until_finished()
        assert m.mirror.request(wait=60)
        assert m.mirror_events()[-1]["mirrored_step"] == step  # not only the first sync's
    m.close()


def test_start_up_io_is_retried_in_the_background_and_never_raises_in_the_caller(tmp_path: Path, monkeypatch,
                                                                                  caplog) -> None:
    d = save_steps(tmp_path / "ck", range(1, 3), epochs=False)
    d.close()
    remote = RemoteStore.open(f"file://{tmp_path / 'mirror'}")
    real, calls = remote.read_manifest, []

    def flaky():  # noqa: ANN202 - the bucket is unreachable for the first read
        calls.append(1)
        if len(calls) == 1:
            raise OSError(113, "No route to host")
        return real()

    monkeypatch.setattr(remote, "read_manifest", flaky)
    monkeypatch.setattr("train_improved.checkpoint.mirror.RETRY_FIRST_S", 0.05)
    with caplog.at_level(logging.WARNING):
        mirror = Mirror(remote, tmp_path / "ck")  # no exception here, whatever the bucket does
        assert mirror.close(wait=60)
    assert "No route to host" in caplog.text and "reachable again" in caplog.text
    assert remote.manifest()[layout.LATEST].step == 2


def test_an_outage_is_retried_at_the_backoff_rate_not_the_save_rate(tmp_path: Path, monkeypatch) -> None:
    d = save_steps(tmp_path / "ck", range(1, 3), epochs=False)
    d.close()
    remote = RemoteStore.open(f"file://{tmp_path / 'mirror'}")
    attempts = []

    def down(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        attempts.append(1)
        raise OSError(5, "I/O error")

    monkeypatch.setattr(remote, "read_manifest", down)
    monkeypatch.setattr("train_improved.checkpoint.mirror.RETRY_FIRST_S", 3600.0)
    mirror = Mirror(remote, tmp_path / "ck")
    mirror.request()
    deadline = time.monotonic() + 60
    while not attempts and time.monotonic() < deadline:
        time.sleep(0.01)
    for _ in range(50):  # saves keep asking while the bucket is down
        mirror.request()
    time.sleep(0.3)
    assert len(attempts) == 1  # the next attempt waits for the backoff, not for the next save
    mirror.close(wait=0)  # closing ends the backoff wait at once
    mirror._thread.join(timeout=10)  # noqa: SLF001
    assert not mirror._thread.is_alive()  # noqa: SLF001


def test_one_damaged_local_file_is_skipped_said_once_and_every_other_file_still_goes_up(tmp_path: Path,
                                                                                      caplog) -> None:
    d = tmp_path / "ck"
    save_steps(d, range(1, 4), epochs=False, best_every=100).close()
    victim = d / "rolling_step_000002.pt"  # bit rot in its tensor bytes: the footer still reads
    data = bytearray(victim.read_bytes())
    data[200] ^= 0xFF
    victim.write_bytes(bytes(data))
    remote = RemoteStore.open(f"file://{tmp_path / 'mirror'}")
    with caplog.at_level(logging.WARNING):
        mirror = Mirror(remote, d)
        assert mirror.request(wait=60) and mirror.request(wait=60)  # the sync succeeds: no emergency waits on it
        mirror.close(wait=60)
    assert caplog.text.count("rolling_step_000002.pt is not uploaded to the mirror") == 1
    assert "retrying in the background" not in caplog.text  # the sync itself succeeded: nothing waits on a retry
    manifest = remote.manifest()
    assert "rolling_step_000002.pt" not in manifest and manifest["rolling_step_000003.pt"].step == 3


def test_close_keeps_the_directory_locked_until_the_uploader_has_stopped(tmp_path: Path, monkeypatch) -> None:
    remote = RemoteStore.open(f"file://{tmp_path / 'mirror'}")
    release, real = threading.Event(), remote.upload

    def stuck(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - a large upload on a slow link
        release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(remote, "upload", stuck)
    m = save_steps(tmp_path / "ck", range(1, 2), remote=remote, epochs=False)
    m.close(mirror_wait=0.1)
    with pytest.raises(CheckpointError, match="in use"):
        CheckpointManager(tmp_path / "ck")  # a second uploader on the same prefix cannot start yet
    release.set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            CheckpointManager(tmp_path / "ck").close()
            break
        except CheckpointError:
            time.sleep(0.05)
    else:
        pytest.fail("the directory stayed locked after the uploader stopped")


def test_a_killed_manifest_write_leaves_no_temporary_behind_on_a_file_mirror(tmp_path: Path) -> None:
    d = save_steps(tmp_path / "ck", range(1, 2), epochs=False)
    d.close()
    root = tmp_path / "mirror"
    remote = RemoteStore.open(f"file://{root}")
    (root / ".tmp-manifest.json.1a2b3c4d").write_bytes(b"{half a manif")  # what kill -9 leaves
    Mirror(remote, tmp_path / "ck").close(wait=60)
    assert not list(root.glob(".tmp-*")) and remote.manifest()[layout.LATEST].step == 1


@pytest.mark.parametrize("where", ["file", "s3"])
def test_the_newest_writer_owns_the_prefix_and_the_older_one_is_fenced_off(tmp_path: Path, where: str,
                                                                           request, caplog) -> None:
    if where == "s3":
        s3 = request.getfixturevalue("s3")
        url, options = "s3://bucket/fenced", {"endpoint_url": s3.url}
    else:
        url, options = f"file://{tmp_path / 'mirror'}", {}
    zombie = save_steps(tmp_path / "old", range(1, 4), remote=RemoteStore.open(url, options), epochs=False)
    assert zombie.mirror.request(wait=60)
    successor = CheckpointManager(tmp_path / "new", CheckpointOptions(save_every=1, keep_rolling=2))
    remote = RemoteStore.open(url, options)
    successor.restore(remote.fetch("latest", tmp_path / "new"))
    successor.attach_mirror(remote)
    assert successor.mirror.request(wait=60)  # it claimed the prefix
    owned = remote.manifest()
    with caplog.at_level(logging.ERROR):
        for step in (4, 5, 6):  # the zombie trains on and saves; its rolling retention would delete step 2, 3
            zombie.save({"w": torch.full((256,), float(step)), "step": step}, step=step)
            zombie.wait_until_finished()
        assert not zombie.mirror.request(wait=60)
    assert "is now written by run " + successor.run_id in caplog.text and "deletes nothing" in caplog.text
    assert zombie.mirror.stopped
    assert remote.manifest() == owned  # the zombie listed nothing and deleted nothing
    for e in owned.values():
        remote.verify_entry(e)
    zombie.close(mirror_wait=0)
    successor.save({"w": torch.zeros(256), "step": 4}, step=4)
    successor.close(mirror_wait=60)
    assert remote.manifest()[layout.LATEST].step == 4 and remote.writer()["run"] == successor.run_id
