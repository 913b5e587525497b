"""What the operator is told (issue 17): branches, honest exit codes, batch logs, the lister, new data.

Each test names the defect it guards against; each failed on the code before the fix.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch

from train_improved.checkpoint import CheckpointManager, CheckpointOptions, Kind, read_footer, storage
from train_improved.save_points import EXIT_NOT_DURABLE

from conftest import CORPUS_BYTES, TINY, corpus_bytes, read_metrics, run_train, train_in_process

ARGS = ["--data", "corpus.txt", *TINY, "--num-epochs", "10", "--keep-checkpoints", "10"]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    (tmp_path / "corpus.txt").write_bytes(corpus_bytes(CORPUS_BYTES))
    return tmp_path


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.unlink()  # break the hard link: only this name is damaged
    path.write_bytes(data[: len(data) // 2])


def test_fallback_stays_on_the_current_branch(run_dir: Path, monkeypatch) -> None:
    # Run A went to step 24; run B went back to step 8 and reached 20. With latest.pt damaged, the old
    # chain took A's step-24 files (newest by step) although B's own step 20 was intact.
    ck = run_dir / "checkpoints"
    assert train_in_process(*ARGS, "--max-steps", "24", cwd=run_dir, monkeypatch=monkeypatch)[0] == 0
    a_run = read_footer(ck / "latest.pt")["lineage"]["run"]
    code, err = train_in_process(*ARGS, "--max-steps", "20", "--lr", "1e-3", "--resume",
                                 str(ck / "rolling_step_000008.pt"), cwd=run_dir, monkeypatch=monkeypatch)
    assert code == 0, err
    b_latest = read_footer(ck / "latest.pt")
    assert b_latest["step"] == 20 and b_latest["lineage"]["ancestry"] == [[a_run, 8]]
    backup = read_footer(ck / "latest_backup.pt")
    assert backup["lineage"]["run"] == b_latest["lineage"]["run"] and backup["step"] < 20  # not A's step 24
    truncate(ck / "latest.pt")
    code, err = train_in_process(*ARGS, "--max-steps", "22", "--lr", "1e-3", "--resume", "latest", cwd=run_dir,
                                 monkeypatch=monkeypatch)
    assert code == 0, err
    text = " ".join(err.split())
    assert "latest.pt failed verification" in text and "at step 20" in text, text
    assert "step 24" not in text


def test_a_run_whose_final_state_is_not_durable_does_not_exit_0(run_dir: Path, monkeypatch) -> None:
    # The disk had no room for the last saves: "done", exit 0, while latest stayed at step 16.
    assert train_in_process(*ARGS, "--max-steps", "16", cwd=run_dir, monkeypatch=monkeypatch)[0] == 0
    code, err = train_in_process(*ARGS, "--max-steps", "20", "--resume", "latest", "--min-free-space", "100TB",
                                 cwd=run_dir, monkeypatch=monkeypatch)
    text = " ".join(err.split())
    assert code == EXIT_NOT_DURABLE, text
    assert "training reached step 20 but its final state could not be saved" in text
    assert "the last durable checkpoint is step 16" in text and "done:" not in text
    assert read_footer(run_dir / "checkpoints" / "latest.pt")["step"] == 16


def test_each_family_gets_the_disk_on_its_own_files_before_copies(tmp_path: Path, monkeypatch) -> None:
    # Best and rolling were summed into one requirement, so both were skipped when either alone fitted.
    state = {"w": torch.zeros(64, 1024)}  # 256 KiB
    with CheckpointManager(tmp_path, CheckpointOptions(save_every=1)) as m:
        m.save(state, step=1)
        m.wait_until_finished()
        size = (tmp_path / "rolling_step_000001.pt").stat().st_size
        monkeypatch.setattr(storage, "free_bytes", lambda d: int(2.5 * size))  # two files, not four
        assert m.save(state, step=2, kinds=[Kind.BEST, Kind.ROLLING], metrics={"val_loss": 1.0})
        results = {r.kind: r for r in m.wait_until_finished()}
    assert results[Kind.ROLLING].error is None and results[Kind.BEST].error is None  # both states, no copies
    assert results[Kind.ROLLING].bytes == results[Kind.ROLLING].file_bytes
    assert not (tmp_path / "best_model_backup.pt").exists()
    assert read_footer(tmp_path / "rolling_last_backup.pt")["step"] == 1  # the copy of step 2 was given up


def test_a_nearly_full_disk_gives_up_redundancy_before_durability(tmp_path: Path, monkeypatch, caplog) -> None:
    # A disk of 5.5 checkpoints: every save commits, first without its copy, then by deleting older rolling files.
    state = {"w": torch.zeros(64, 1024)}
    with CheckpointManager(tmp_path, CheckpointOptions(save_every=1, keep_rolling=5)) as m:
        m.save(state, step=1)
        m.wait_until_finished()
        size = (tmp_path / "rolling_step_000001.pt").stat().st_size

        def free(d: Path) -> int:  # what a real disk of that size would have left: each inode counted once
            used = {p.stat().st_ino: p.stat().st_size for p in tmp_path.iterdir() if p.is_file()}
            return int(5.5 * size) - sum(used.values())

        monkeypatch.setattr(storage, "free_bytes", free)
        with caplog.at_level(logging.WARNING):
            for step in range(2, 7):
                assert m.save(state, step=step)
                (result,) = m.wait_until_finished()
                assert result.error is None and m.latest().step == step  # nothing skipped: the newest state is durable
    text = " ".join(caplog.text.split())
    assert "for rolling_last_backup.pt, the independent copy of the rolling save at step 4" in text
    assert "low on disk space: deleted rolling_step_000001.pt to make room for the save at step 5" in text
    assert "skipping this save" not in text
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert any(r["event"] == "delete" and r.get("reason") == "low disk space" for r in history)
    assert {p.name for p in tmp_path.glob("rolling_step_*")} >= {"rolling_step_000005.pt", "rolling_step_000006.pt"}


def test_a_batch_log_has_timestamped_progress_per_interval_and_a_line_per_save(run_dir: Path) -> None:
    out = run_train(*ARGS, "--max-steps", "400", "--num-epochs", "40", "--log-interval", "1s", cwd=run_dir)  # a pipe
    assert out.returncode == 0, out.stderr
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
    progress = re.findall(rf"^({stamp}) step (\d+)/400 .* tok/s  ETA \S+$", out.stderr, flags=re.M)
    assert len(progress) >= 2 and progress[-1][1] == "400", out.stderr  # the last step always has its line
    # One line per interval, whatever the machine's speed: never two in the same second (interval 1 s),
    # and never a gap longer than the interval plus the longest wait between two steps (eval, saves).
    seconds = [datetime.strptime(t, "%Y-%m-%d %H:%M:%S").timestamp() for t, _ in progress]
    records = read_metrics(run_dir / "runs" / "metrics.jsonl")
    step_times = [r["time"] for r in records if r["event"] == "step"]
    longest = max(b - a for a, b in zip(step_times, step_times[1:], strict=False))
    gaps = [b - a for a, b in zip(seconds, seconds[1:], strict=False)]
    assert min(gaps[:-1], default=1) >= 1, gaps  # the last step's line comes whenever the run ends
    assert max(gaps) <= 1 + longest + 1, (gaps, longest)  # +1: the stamps are whole seconds
    saves = [r for r in records if r["event"] == "checkpoint"]
    lines = re.findall(rf"^{stamp} INFO saved (\S+) \(step (\d+), .*stall .*write", out.stderr, flags=re.M)
    assert sorted(lines) == sorted((Path(r["path"]).name, str(r["step"])) for r in saves)


def test_a_metric_the_run_does_not_produce_is_refused(run_dir: Path) -> None:
    out = run_train(*ARGS, "--metric", "accuracy", cwd=run_dir)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "--metric 'accuracy' is not a metric this run produces: choose val_loss or train_loss" in \
        " ".join(out.stderr.split())
    assert not (run_dir / "checkpoints").exists()


def test_the_emergency_hint_is_a_command_that_works(run_dir: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "train_improved", *ARGS, "--max-steps", "400",
                             "--checkpoint-dir", "elsewhere/ck"], cwd=run_dir, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "runs" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(read_metrics(metrics)) > 20) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    hint = re.search(r"resume with: (train .*)$", err, flags=re.M)[1]
    assert hint == "train --resume latest --checkpoint-dir elsewhere/ck"
    again = run_train(*hint.split()[1:], "--max-steps", "30", cwd=run_dir)
    assert again.returncode == 0 and "resumed from" in again.stderr, again.stderr


def test_the_lister_shows_a_failed_verification_and_never_cuts_numbers(run_dir: Path, monkeypatch) -> None:
    assert train_in_process(*ARGS, "--max-steps", "24", cwd=run_dir, monkeypatch=monkeypatch)[0] == 0
    ck = run_dir / "checkpoints"
    data = bytearray((ck / "latest.pt").read_bytes())
    data[len(data) // 2] ^= 1
    (ck / "latest.pt").unlink()
    (ck / "latest.pt").write_bytes(bytes(data))  # the footer reads fine; the tensors do not verify
    code, err = train_in_process(*ARGS, "--max-steps", "24", "--resume", "latest", cwd=run_dir,
                                 monkeypatch=monkeypatch)
    assert code == 0 and "latest.pt failed verification" in " ".join(err.split())
    listing = run_train("--list-checkpoints", "--json", cwd=run_dir)  # no --verify: history remembers
    rows = {r["name"]: r for r in json.loads(listing.stdout)["checkpoints"]}
    assert listing.returncode == 1 and rows["latest.pt"]["status"].startswith("BAD: failed verification")
    assert rows["rolling_step_000016.pt"]["val_loss_step"] == 10  # the evaluation it carries is step 10's
    narrow = run_train("--list-checkpoints", cwd=run_dir, env={"COLUMNS": "80"})
    assert not re.search(r"│ +\d+… +│", narrow.stdout)  # no number cut short (the status column may fold)
    for name, row in rows.items():
        assert re.search(rf"│ {re.escape(name)}\b.*│ +{row['step']} │", narrow.stdout), name


def test_other_data_continues_from_a_new_epoch_and_init_from_starts_a_new_run(run_dir: Path, monkeypatch) -> None:
    assert train_in_process(*ARGS, "--max-steps", "16", cwd=run_dir, monkeypatch=monkeypatch)[0] == 0
    (run_dir / "other.txt").write_bytes(corpus_bytes(CORPUS_BYTES * 2)[CORPUS_BYTES:])
    code, err = train_in_process(*ARGS, "--max-steps", "20", "--resume", "latest", "--data", "other.txt",
                                 cwd=run_dir, monkeypatch=monkeypatch)
    text = " ".join(err.split())
    assert code == 0, text
    assert "changes the trajectory" in text and "starts a new epoch" in text
    assert "the training data differs from the checkpoint's: continuing from step 16" in text
    state = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    assert state["step"] == 20 and state["dataloader_state"]["train_epoch"] == 2  # epoch 1 was cut short
    # --init-from: the weights, nothing else. With --lr 0 one step leaves them as they were.
    fine = run_dir / "fine"
    fine.mkdir()
    shutil.copy(run_dir / "other.txt", fine / "other.txt")
    code, err = train_in_process("--data", "other.txt", "--init-from", str(run_dir / "checkpoints" / "latest.pt"),
                                 "--max-steps", "1", "--lr", "0", "--sample-length", "0", "--eval-steps", "1",
                                 cwd=fine, monkeypatch=monkeypatch)
    assert code == 0, err
    tuned = torch.load(fine / "checkpoints" / "latest.pt", weights_only=True)
    assert tuned["step"] == 1 and tuned["args"]["n_embd"] == 32  # the shape came from the checkpoint
    assert all(torch.equal(tuned["model"][k], state["model"][k]) for k in state["model"])
    assert tuned["optimizer"]["state"][0]["step"] == 1  # a new optimizer


def test_start_up_banner_and_warnings(run_dir: Path, monkeypatch) -> None:
    texts = run_dir / "texts"
    (texts / "sub").mkdir(parents=True)
    (texts / "a.txt").write_bytes(corpus_bytes(CORPUS_BYTES))
    (texts / "notes.md").write_text("ignored")
    code, err = train_in_process("--data", "texts", *TINY, "--max-steps", "4", "--warmup-steps", "10", cwd=run_dir,
                                 monkeypatch=monkeypatch)
    text = " ".join(err.split())
    assert code == 0, text
    assert f"data: 1 .txt files in {texts} (ignored: 1 subdirectories, 1 other files): 3,150 training tokens" in text
    assert "model: 0.03M parameters" in text and "checkpoints:" in text
    assert "--warmup-steps 10 is not shorter than the run (4 steps)" in text


def test_when_every_checkpoint_is_damaged_the_error_summarizes_then_lists(run_dir: Path, monkeypatch) -> None:
    assert train_in_process(*ARGS, "--max-steps", "8", cwd=run_dir, monkeypatch=monkeypatch)[0] == 0
    for p in (run_dir / "checkpoints").glob("*.pt"):
        p.unlink()
        p.write_bytes(b"x" * 100)
    out = run_train(*ARGS, "--resume", "latest", cwd=run_dir)
    lines = out.stderr.strip().splitlines()
    summary = next(i for i, line in enumerate(lines) if line.startswith("error:"))
    assert out.returncode == 1 and "all 7 failed verification" in lines[summary] and len(lines[summary]) < 200
    assert all(line.startswith("  ") and ".pt: " in line for line in lines[summary + 1:]) and \
        len(lines) - summary - 1 == 7


def test_the_disk_plan_puts_every_state_before_any_copy() -> None:
    from train_improved.checkpoint.space import fit

    assert fit([Kind.BEST, Kind.ROLLING], per_file=10, budget=25) == ([Kind.ROLLING, Kind.BEST], [])
    assert fit([Kind.BEST, Kind.ROLLING], per_file=10, budget=35) == ([Kind.ROLLING, Kind.BEST], [Kind.ROLLING])
    assert fit([Kind.EPOCH, Kind.EMERGENCY], per_file=10, budget=15) == ([Kind.EMERGENCY], [])


def test_the_lister_shows_the_runs_own_metric(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "corpus.txt").write_bytes(corpus_bytes(CORPUS_BYTES))
    code, err = train_in_process("--data", "corpus.txt", *TINY, "--max-steps", "8", "--metric", "train_loss",
                                 cwd=tmp_path, monkeypatch=monkeypatch)
    assert code == 0, err
    listing = run_train("--list-checkpoints", cwd=tmp_path, env={"COLUMNS": "200"})
    header = next(line for line in listing.stdout.splitlines() if "file" in line and "step" in line)
    assert "train_loss" in header and "val_loss" not in header
    rows = {r["name"]: r for r in json.loads(run_train("--list-checkpoints", "--json", cwd=tmp_path).stdout)["checkpoints"]}
    best = rows["best_model.pt"]
    assert best["metric"] == "train_loss" and best["metric_value"] == read_footer(
        tmp_path / "checkpoints" / "best_model.pt")["metrics"]["train_loss"]
