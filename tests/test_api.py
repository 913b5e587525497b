"""The public store API in someone else's loop (issue 15): mistakes raise in save(), edges hold.

Each test names the defect it guards against; each failed on the code before the fix.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train_improved.checkpoint as api
from train_improved.checkpoint import (
    RESERVED_META_KEYS,
    CheckpointError,
    CheckpointManager,
    CheckpointOptions,
    Kind,
    NoCheckpointError,
    SaveResult,
    fileformat,
    storage,
)
from train_improved.checkpoint.storage import Shards

from conftest import ROOT, run_train

CHECKPOINTING = (ROOT / "CHECKPOINTING.md").read_text()


def st(step: int) -> dict:
    return {"model": {"w": torch.full((16, 16), float(step))}, "step": step}


@dataclasses.dataclass
class GPTConfig:
    n_layer: int = 2


# ------------------------------------------------------------------ 1-3: refused in save(), where the mistake is


@pytest.mark.parametrize("bad, where, fix", [
    ({"config": GPTConfig()}, "state['config']", "dataclasses.asdict"),
    ({"opt": {"lr": np.float64(0.1)}}, "state['opt']['lr']", ".item()"),
    ({"steps": [1, np.int64(2)]}, "state['steps'][1]", ".item()"),
    ({"kind": Kind.ROLLING}, "state['kind']", "safe_globals"),
])
def test_a_state_that_cannot_be_restored_is_refused_at_save_time(tmp_path: Path, bad: dict, where: str,
                                                                 fix: str) -> None:
    with CheckpointManager(tmp_path) as m:
        with pytest.raises(TypeError) as err:
            m.save({**st(1), **bad}, step=1)
    assert where in str(err.value) and "not plain data" in str(err.value) and fix in str(err.value)
    assert not list(tmp_path.glob("*.pt"))


def test_your_own_types_are_allowed_deliberately_with_safe_globals(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, CheckpointOptions(safe_globals=(GPTConfig,))) as m:
        m.save({**st(1), "config": GPTConfig(3)}, step=1)
    with pytest.raises(CheckpointError, match="arbitrary code"):
        CheckpointManager(tmp_path, read_only=True).restore("latest")
    state, _ = CheckpointManager(tmp_path, read_only=True).restore("latest", safe_globals=[GPTConfig])
    assert state["config"] == GPTConfig(3)


def test_verify_in_the_lister_also_checks_that_a_file_loads(tmp_path: Path) -> None:
    # A checkpoint whose bytes are intact but which weights_only=True refuses used to show as "verified".
    storage.write_checkpoint(tmp_path / "rolling_step_000001.pt", {"config": GPTConfig()},
                             {"step": 1, "kind": "rolling", "name": "rolling_step_000001.pt"})
    out = run_train("--list-checkpoints", "--verify", "--json", "--checkpoint-dir", str(tmp_path), cwd=tmp_path)
    (row,) = json.loads(out.stdout)["checkpoints"]
    assert out.returncode == 1 and row["status"].startswith("BAD") and "arbitrary code" in row["status"]


def test_metrics_are_plain_finite_numbers(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path) as m:
        assert m.save(st(1), step=1, kinds=Kind.BEST, metrics={"val_loss": torch.tensor(2.5)})  # 0-d tensor
        assert m.save(st(2), step=2, kinds=Kind.BEST, metrics={"val_loss": np.float32(2.0)})  # numpy scalar
        m.wait_until_finished()
        assert m.best_value == 2.0 and fileformat.read_footer(tmp_path / "best_model.pt")["metrics"] == {"val_loss": 2.0}
        for bad in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match="finite"):
                m.save(st(3), step=3, kinds=Kind.BEST, metrics={"val_loss": bad})
        with pytest.raises(TypeError, match="not a number"):
            m.save(st(3), step=3, metrics={"val_loss": "low"})


def test_a_best_that_fails_to_commit_leaves_no_phantom_best(tmp_path: Path, monkeypatch) -> None:
    with CheckpointManager(tmp_path) as m:
        m.save(st(1), step=1, kinds=Kind.BEST, metrics={"val_loss": 3.0})
        m.wait_until_finished()
        monkeypatch.setattr(storage.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(5, "Input/output error")))
        assert m.save(st(2), step=2, kinds=Kind.BEST, metrics={"val_loss": 1.0})
        assert m.best_value == 3.0  # not before the commit
        (result,) = m.wait_until_finished()
        monkeypatch.undo()
        assert result.error and m.best_value == 3.0
        assert m.is_improvement({"val_loss": 2.0})


@pytest.mark.parametrize("call, message", [
    (lambda m: m.save(st(1), step=1, meta={"blob": "x" * 70_000}), "zip comment holds"),
    (lambda m: m.save(st(1), step=1, kinds=Kind.EPOCH), "needs epoch="),
    (lambda m: m.save(st(1), step=1, kinds=Kind.BEST, metrics={"loss": 1.0}), r"needs metrics\['val_loss'\]"),
    (lambda m: m.save(st(1), step=1, meta={"args": {"lr": 1}}), "reserved"),
    (lambda m: m.save(st(1), step=1, meta={"step": 3}), "reserved"),
])
def test_bad_meta_epoch_or_best_fail_in_save_not_in_the_writer(tmp_path: Path, call, message: str) -> None:
    with CheckpointManager(tmp_path) as m:
        with pytest.raises(ValueError, match=message):
            call(m)
        assert m.wait_until_finished() == []
    assert not list(tmp_path.glob("*.pt")) and not (tmp_path / "history.jsonl").exists()


def test_reserved_keys_are_documented() -> None:
    for key in RESERVED_META_KEYS:
        assert f"`{key}`" in CHECKPOINTING, key


# ------------------------------------------------------------------ 4-6: emergency saves, close(), read-only


def test_emergency_save_skips_the_read_back_over_its_budget(tmp_path: Path, caplog) -> None:
    with CheckpointManager(tmp_path) as m:
        m.save(st(1), step=1)
        m.wait_until_finished()
        assert m.expected_save_seconds() is not None
        with caplog.at_level(logging.WARNING):
            results = m.emergency_save(st(2), step=2, budget=0.0)
        assert [r.kind for r in results] == [Kind.EMERGENCY] and not results[0].error
    assert "skipping its read-back verification" in caplog.text
    assert api.verify_file(tmp_path / results[0].name)["kind"] == "emergency"


def test_an_emergency_save_of_host_tensors_is_written_in_place_without_staging_memory(tmp_path: Path) -> None:
    # The caller waits for an emergency save anyway: a copy (and, as the run's first save, the
    # allocation of a state-sized staging area) would only spend the SIGTERM's grace.
    with CheckpointManager(tmp_path) as m:
        (result,) = m.emergency_save(st(3), step=3)
        assert m._staging is None  # no state-sized buffers were allocated
        restored, info = m.restore(result.name)
    assert info.kind == Kind.EMERGENCY and torch.equal(restored["model"]["w"], st(3)["model"]["w"])


def test_close_returns_the_results_of_the_last_save(tmp_path: Path) -> None:
    m = CheckpointManager(tmp_path)
    m.save(st(1), step=1)
    results = m.close()
    assert [(r.kind, r.step, r.error) for r in results] == [(Kind.ROLLING, 1, None)]
    assert all(isinstance(r, SaveResult) for r in results)


def test_read_only_on_a_directory_that_does_not_exist_yet(tmp_path: Path) -> None:
    # A non-zero DDP rank may open the store before rank 0 has created it.
    m = CheckpointManager(tmp_path / "not_yet", read_only=True)
    assert m.all() == [] and m.latest() is None and m.latest_step() is None and m.best_value is None
    with pytest.raises(NoCheckpointError):
        m.restore("latest")


def test_train_refuses_a_store_written_by_another_loop_in_one_line(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path / "checkpoints") as m:
        m.save(st(1), step=1)
    out = run_train("--resume", "latest", cwd=tmp_path)
    assert out.returncode == 1 and "holds no train options" in out.stderr and "Traceback" not in out.stderr
    tool = subprocess.run([sys.executable, str(ROOT / "tools" / "generate_resume_command.py"),
                           str(tmp_path / "checkpoints" / "latest.pt")], capture_output=True, text=True)
    assert tool.returncode == 1 and "holds no training options" in tool.stderr


# ------------------------------------------------------------------ 8-13: store edges


def test_a_low_disk_cleanup_never_deletes_the_staging_directory_of_the_save_it_checks(tmp_path: Path,
                                                                                      monkeypatch) -> None:
    with CheckpointManager(tmp_path) as m:
        staging = m.staging_directory()
        staging.mkdir()
        (staging / "__0_0.distcp").write_bytes(b"shard")
        digest = fileformat.hash_file(staging / "__0_0.distcp")
        shards = Shards(staging, {"__0_0.distcp": {"bytes": 5, "digest": digest}})
        frees = iter([0])  # short before the cleanup, plenty after it
        monkeypatch.setattr(storage, "free_bytes", lambda d: next(frees, 1 << 40))
        assert m.save({"step": 1, "sharded": True}, step=1, shards=shards)
        (result,) = m.wait_until_finished()
    assert result.error is None, result.error
    assert (tmp_path / "rolling_step_000001.pt" / "__0_0.distcp").read_bytes() == b"shard"


def test_a_file_retention_cannot_delete_is_a_warning_and_a_history_record(tmp_path: Path, monkeypatch,
                                                                          caplog) -> None:
    real_remove = storage.remove

    def stuck(path: Path) -> None:
        if path.name.startswith("rolling_step_"):
            raise PermissionError(13, "Permission denied")
        real_remove(path)

    monkeypatch.setattr(storage, "remove", stuck)
    with caplog.at_level(logging.WARNING), CheckpointManager(tmp_path, CheckpointOptions(keep_rolling=1)) as m:
        for step in (1, 2, 3):
            m.save(st(step), step=step)
        results = m.wait_until_finished()
        assert m.latest().step == 3
    assert all(r.error is None for r in results)
    assert "retention could not delete rolling_step_000001.pt" in caplog.text and "training goes on" in caplog.text
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert any(r["event"] == "delete_failed" and r["name"] == "rolling_step_000001.pt" for r in history)
    assert [r["step"] for r in history if r["event"] == "save"] == [1, 2, 3]


def test_a_failed_best_save_changes_nothing(tmp_path: Path, monkeypatch) -> None:
    with CheckpointManager(tmp_path, CheckpointOptions(save_every=None)) as m:
        for step, value in ((1, 3.0), (2, 2.0)):
            m.save(st(step), step=step, kinds=Kind.BEST, metrics={"val_loss": value})
        m.wait_until_finished()
        before = {n: (tmp_path / n).read_bytes() for n in ("best_model.pt", "best_model_backup.pt",
                                                           "best_model_previous.pt")}
        real_replace = os.replace

        def refuse_the_new_best(src, dst, *a, **k):
            if Path(dst).name == "best_model.pt":
                raise OSError(5, "Input/output error")
            return real_replace(src, dst, *a, **k)

        monkeypatch.setattr(storage.os, "replace", refuse_the_new_best)
        m.save(st(3), step=3, kinds=Kind.BEST, metrics={"val_loss": 1.0})
        (result,) = m.wait_until_finished()
        monkeypatch.undo()
    assert result.error and "Input/output error" in result.error
    assert {n: (tmp_path / n).read_bytes() for n in before} == before  # the older previous-best survives
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_checkpoint_committed_after_latest_is_resumed_and_listed(tmp_path: Path, caplog) -> None:
    # A kill between a file's rename and latest's move: rolling_step_000003.pt is whole, latest.pt at 2.
    with CheckpointManager(tmp_path, CheckpointOptions(save_every=1)) as m:
        for step in (1, 2, 3):
            m.save(st(step), step=step)
    (tmp_path / "latest.pt").unlink()
    os.link(tmp_path / "rolling_step_000002.pt", tmp_path / "latest.pt")
    with caplog.at_level(logging.WARNING), CheckpointManager(tmp_path) as m:
        state, info = m.restore("latest")
    assert state["step"] == 3 and info.name in ("rolling_step_000003.pt", "rolling_last_backup.pt")
    assert "newer than latest.pt" in caplog.text
    out = run_train("--list-checkpoints", "--json", "--checkpoint-dir", str(tmp_path), cwd=tmp_path)
    rows = {r["name"]: r for r in json.loads(out.stdout)["checkpoints"]}
    assert "newer than latest.pt" in rows["rolling_step_000003.pt"]["notes"]


def test_the_lister_does_not_call_the_previous_best_the_best(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, CheckpointOptions(save_every=None)) as m:
        for step, value in ((1, 3.0), (2, 2.0)):
            m.save(st(step), step=step, kinds=Kind.BEST, metrics={"val_loss": value})
    out = run_train("--list-checkpoints", "--checkpoint-dir", str(tmp_path), cwd=tmp_path,
                    env={"COLUMNS": "200"})
    line = next(x for x in out.stdout.splitlines() if "best_model_previous.pt" in x)
    assert "best_model.pt" not in line.replace("best_model_previous.pt", "")
    latest = next(x for x in out.stdout.splitlines() if "latest.pt" in x)
    assert "= best_model.pt" in latest  # latest.pt is the same file as best_model.pt: that is said


def test_listing_while_retention_deletes_a_file(tmp_path: Path, monkeypatch) -> None:
    from train_improved.checkpoint import records

    with CheckpointManager(tmp_path, CheckpointOptions(save_every=1)) as m:
        for step in (1, 2):
            m.save(st(step), step=step)
    real = records.describe

    def pruned_meanwhile(path: Path):
        if path.name == "rolling_step_000001.pt":
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real(path)

    monkeypatch.setattr(records, "describe", pruned_meanwhile)
    names = [i.name for i in CheckpointManager(tmp_path, read_only=True).all()]
    assert "rolling_step_000001.pt" not in names and "rolling_step_000002.pt" in names


def test_fsync_uses_f_fullfsync_where_the_platform_has_it(tmp_path: Path, monkeypatch) -> None:
    # macOS: os.fsync reaches the drive's cache only; F_FULLFSYNC flushes the drive (python-atomicwrites).
    calls = []
    monkeypatch.setattr(storage.fcntl, "F_FULLFSYNC", 51, raising=False)
    monkeypatch.setattr(storage.fcntl, "fcntl", lambda fd, op, *a: calls.append(op))
    monkeypatch.setattr(storage.os, "fsync", lambda fd: calls.append("fsync"))
    storage.write_checkpoint(tmp_path / "a.pt", st(1), {"step": 1})
    assert calls and set(calls) == {51}


# ------------------------------------------------------------------ the documented API, as documented


def test_the_api_table_matches_what_the_package_exports() -> None:
    section = CHECKPOINTING.split("### Everything `train_improved.checkpoint` exports", 1)[1].split("\n#", 1)[0]
    documented = set(re.findall(r"^\| `(\w+)", section, flags=re.M))
    assert documented == set(api.__all__)


def test_the_documented_example_runs_as_written(tmp_path: Path, monkeypatch) -> None:
    section = CHECKPOINTING.split("## Using the store from your own loop", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S)[1]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "CHECKPOINTING.md", "exec"), {"__name__": "__main__"})
    assert (tmp_path / "checkpoints" / "latest.pt").exists()
    exec(compile(code, "CHECKPOINTING.md", "exec"), {"__name__": "__main__"})  # a second run resumes


def test_the_example_loop_stops_on_sigterm_and_resumes_exactly(tmp_path: Path) -> None:
    example = [sys.executable, str(ROOT / "examples" / "custom_loop.py"), "--steps", "120"]
    subprocess.run([*example, "--dir", "ref"], cwd=tmp_path, check=True, capture_output=True)
    proc = subprocess.Popen([*example, "--dir", "ck", "--step-delay", "0.02"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "ck" / "rolling_step_000025.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "emergency checkpoint at step" in out and list((tmp_path / "ck").glob("emergency_step_*.pt"))
    again = subprocess.run([*example, "--dir", "ck"], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert "resumed from" in again.stdout
    ours = torch.load(tmp_path / "ck" / "latest.pt", weights_only=True)
    theirs = torch.load(tmp_path / "ref" / "latest.pt", weights_only=True)
    assert ours["step"] == theirs["step"] == 120
    assert all(torch.equal(ours["model"][k], theirs["model"][k]) for k in theirs["model"])


def test_the_old_best_has_a_final_name_at_every_instant_of_a_best_save(tmp_path: Path, monkeypatch) -> None:
    from train_improved.checkpoint import read_footer

    with CheckpointManager(tmp_path, CheckpointOptions(save_every=None)) as m:
        for step, value in ((1, 3.0), (2, 2.0)):
            m.save(st(step), step=step, kinds=Kind.BEST, metrics={"val_loss": value})
        m.save(st(2), step=2, kinds=Kind.ROLLING)  # latest.pt no longer names the old best
        m.wait_until_finished()
        old_best = read_footer(tmp_path / "best_model.pt")["digest"]
        real_write, seen = storage.write_checkpoint, []

        def kill_window(final, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            # What a kill -9 right after the new best's rename would leave under final names (temporaries
            # are removed by the next writing open).
            out = real_write(final, *args, **kwargs)
            seen.append({read_footer(p)["digest"] for p in tmp_path.glob("*.pt") if not p.name.startswith(".tmp-")})
            return out

        monkeypatch.setattr(storage, "write_checkpoint", kill_window)
        m.save(st(3), step=3, kinds=Kind.BEST, metrics={"val_loss": 1.0})
        m.wait_until_finished()
    assert seen and old_best in seen[0]
    assert read_footer(tmp_path / "best_model_previous.pt")["digest"] == old_best


def test_graceful_stop_installs_without_a_with_block_for_flat_scripts() -> None:
    from train_improved.checkpoint import GracefulStop

    before = signal.getsignal(signal.SIGUSR1)
    stop = GracefulStop().install()  # nanoGPT-style: no re-indented loop
    assert signal.getsignal(signal.SIGUSR1) != before and not stop.requested
    os.kill(os.getpid(), signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while not stop.requested and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stop.signum == signal.SIGUSR1 and stop.at is not None and stop.at <= time.monotonic()
    stop.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_the_documented_mirror_example_resumes_from_the_mirror_alone(tmp_path: Path, monkeypatch) -> None:
    from train_improved.checkpoint import RemoteStore

    section = CHECKPOINTING.split("**The second tier from your own loop.**", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S)[1]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "CHECKPOINTING.md", "exec"), {"__name__": "__main__"})
    shutil.rmtree(tmp_path / "checkpoints")  # the machine is gone
    exec(compile(code, "CHECKPOINTING.md", "exec"), {"__name__": "__main__"})
    manifest = RemoteStore.open(f"file://{tmp_path / 'bucket' / 'run1'}").manifest()
    assert manifest["latest.pt"].step == 60 and (tmp_path / "checkpoints" / "rolling_step_000030.pt").exists()
