"""Interruptions and exact resume, against the real program (SPEC §5 "Exact resume", "Signals").

The run under test has dropout and gradient accumulation, ~12 steps per epoch, an evaluation every
10 steps and a rolling checkpoint every 4: a random stop lands before, on or after each of them.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train_improved.checkpoint import read_footer, verify_file

from conftest import CORPUS_BYTES, STEPS_PER_EPOCH, TINY, read_metrics, run_train, step_losses

STEPS = 40
ARGS = [*TINY, "--max-steps", str(STEPS), "--num-epochs", "10"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted run that every interrupted run must reproduce bit for bit."""
    from conftest import corpus_bytes

    d = tmp_path_factory.mktemp("reference")
    (d / "corpus.txt").write_bytes(corpus_bytes(CORPUS_BYTES))
    run_train("--data", "corpus.txt", *ARGS, cwd=d, check=True)
    # The interruptions below must straddle epoch ends and evaluations for the test to mean anything.
    assert STEPS_PER_EPOCH == 12 and (d / "checkpoints" / "epoch_00002.pt").exists()
    assert [r["step"] for r in read_metrics(d / "runs" / "metrics.jsonl") if r["event"] == "eval"] == [10, 20, 30, 40]
    return d


def final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    assert state["step"] == STEPS
    return state["model"]


def assert_same_run(run_dir: Path, reference: Path) -> None:
    assert step_losses(run_dir / "runs" / "metrics.jsonl") == step_losses(reference / "runs" / "metrics.jsonl")
    ours, theirs = final_model(run_dir), final_model(reference)
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


def start(run_dir: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "train_improved", "--data", "corpus.txt", *ARGS, *extra],
                            cwd=run_dir, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    metrics = run_dir / "runs" / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"train ended early ({proc.returncode}): {proc.stderr.read()}")
        if metrics.exists() and any(r["event"] == "step" and r["step"] >= step for r in read_metrics(metrics)):
            return
        time.sleep(0.005)
    raise AssertionError(f"step {step} not reached")


@pytest.fixture
def run_dir(tmp_path: Path, reference: Path) -> Path:
    (tmp_path / "corpus.txt").write_bytes((reference / "corpus.txt").read_bytes())
    return tmp_path


@pytest.mark.parametrize("sig, lo, hi", [
    (signal.SIGINT, 2, 11),    # before the first epoch boundary and evaluation
    (signal.SIGTERM, 12, 24),  # across an epoch boundary (12 steps per epoch) and the evaluation at 20
    (signal.SIGHUP, 25, 36),
    (signal.SIGUSR1, 2, 36),
])
def test_signal_then_resume_is_bitwise_exact(run_dir: Path, reference: Path, sig: signal.Signals, lo: int, hi: int) -> None:
    target = random.randint(lo, hi)  # seeded: conftest.TEST_SEED
    proc = start(run_dir)
    wait_for_step(run_dir, target, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, f"target {target}: {err}"
    ck = run_dir / "checkpoints"
    emergency = sorted(ck.glob("emergency_step_*.pt"))
    assert len(emergency) == 1, err
    latest = torch.load(ck / "latest.pt", weights_only=True)
    assert latest["checkpoint_type"] == "emergency"
    assert emergency[0].name.startswith(f"emergency_step_{latest['step']:06d}_")
    assert latest["step"] < STEPS, f"the signal came too late to test anything (target {target})"

    out = run_train("--data", "corpus.txt", *ARGS, "--resume", "latest", cwd=run_dir, check=True)
    assert f"at step {latest['step']}" in out.stderr
    (record,) = [r for r in read_metrics(run_dir / "runs" / "metrics.jsonl") if r["event"] == "resume"]
    assert record["step"] == latest["step"] and (run_dir / record["path"]).resolve() == ck / "latest.pt"
    # The record names the line of training: this run, and the run it continues (metrics may repeat steps).
    assert record["parent"] == read_footer(emergency[0])["lineage"]["run"] != record["run"]
    assert_same_run(run_dir, reference)


def test_resume_from_an_explicit_rolling_checkpoint(run_dir: Path, reference: Path) -> None:
    run_train("--data", "corpus.txt", *ARGS, "--max-steps", "16", cwd=run_dir, check=True)
    # A run stopped by --max-steps has a shorter schedule, so resume from a file with the full one.
    ck = run_dir / "checkpoints"
    for p in ck.iterdir():
        p.unlink()
    (run_dir / "runs" / "metrics.jsonl").unlink()
    proc = start(run_dir)
    wait_for_step(run_dir, 9, proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    path = ck / "rolling_step_000008.pt"
    assert path.exists()
    metrics = run_dir / "runs" / "metrics.jsonl"
    # Keep only what the run logged up to step 8: the resume must regenerate the rest exactly.
    kept = [line for line in metrics.read_text().splitlines() if '"step": ' not in line or
            int(line.split('"step": ')[1].split(",")[0].split("}")[0]) <= 8]
    metrics.write_text("\n".join(kept) + "\n")
    run_train("--data", "corpus.txt", *ARGS, "--resume", str(path), cwd=run_dir, check=True)
    assert_same_run(run_dir, reference)


def test_resume_best_restores_that_state(reference: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(reference, tmp_path / "r")
    best = torch.load(tmp_path / "r" / "checkpoints" / "best_model.pt", weights_only=True)
    out = run_train("--data", "corpus.txt", *ARGS, "--resume", "best", "--max-steps", str(best["step"]),
                    cwd=tmp_path / "r")
    assert out.returncode == 0, out.stderr
    assert f"resumed from {tmp_path / 'r' / 'checkpoints' / 'best_model.pt'} at step {best['step']}" in out.stderr


def test_resume_auto_starts_fresh_on_an_empty_directory(run_dir: Path) -> None:
    out = run_train("--data", "corpus.txt", *ARGS, "--max-steps", "3", "--resume", "auto", cwd=run_dir)
    assert out.returncode == 0, out.stderr
    assert "starting fresh" in out.stderr
    assert torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)["step"] == 3
    again = run_train("--data", "corpus.txt", *ARGS, "--max-steps", "5", "--resume", "auto", cwd=run_dir)
    assert again.returncode == 0 and "at step 3" in again.stderr


def test_overrides_are_classified(reference: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(reference, tmp_path / "r")
    ck = tmp_path / "r" / "checkpoints"
    before = {p.name: p.read_bytes() for p in ck.glob("*.pt")}
    bad = run_train("--data", "corpus.txt", *ARGS, "--resume", "latest", "--n-embd", "64", cwd=tmp_path / "r")
    assert bad.returncode == 1 and "incompatible" in bad.stderr and "Traceback" not in bad.stderr
    assert {p.name: p.read_bytes() for p in ck.glob("*.pt")} == before  # refused before anything was written
    ok = run_train("--data", "corpus.txt", *ARGS, "--resume", "latest", "--eval-steps", "3", "--lr", "1e-3",
                   "--max-steps", str(STEPS + 2), cwd=tmp_path / "r")
    assert ok.returncode == 0, ok.stderr
    assert "harmless" in ok.stderr and "changes the trajectory" in ok.stderr


def test_exception_in_the_loop_leaves_an_emergency_checkpoint(tmp_path: Path, text_file: Path, monkeypatch) -> None:
    from train_improved.checkpoint import CheckpointManager
    from train_improved.config import resolve
    from train_improved.metrics import MetricsLogger
    from train_improved.signals import GracefulStop
    from train_improved.trainer import Trainer

    cfg = resolve(cli={"data": str(text_file), "max_steps": 30, "checkpoint_dir": str(tmp_path / "ck"),
                       "n_layer": 1, "n_embd": 16, "n_head": 2, "block_size": 16, "batch_size": 4,
                       "mini_batch_size": 2, "sample_length": 0}, environ={}, config_file=None)
    trainer = Trainer(cfg)
    real_step = Trainer.train_step

    def failing_step(self, stop):
        if self.step == 7:
            raise RuntimeError("injected failure")
        return real_step(self, stop)

    monkeypatch.setattr(Trainer, "train_step", failing_step)
    with CheckpointManager(cfg.checkpoint_dir) as m, GracefulStop() as stop:
        with pytest.raises(RuntimeError, match="injected failure"):
            trainer.run(stop, m, MetricsLogger(tmp_path / "m.jsonl"))
    emergency = list((tmp_path / "ck").glob("emergency_step_000007_*.pt"))
    assert len(emergency) == 1
    assert torch.load(emergency[0], weights_only=True)["step"] == 7


def test_second_sigint_exits_at_once_and_corrupts_nothing(run_dir: Path) -> None:
    from train_improved.checkpoint import verify_file

    big = ["--n-embd", "512", "--n-head", "4", "--n-layer", "4"]  # ~150 MB of state: the emergency save takes a while
    proc = start(run_dir, *big)
    wait_for_step(run_dir, 3, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "second interrupt" in err and "Traceback" not in err
    ck = run_dir / "checkpoints"
    for p in ck.glob("*.pt"):
        verify_file(p)  # whatever was committed is whole
    out = run_train("--data", "corpus.txt", *ARGS, *big, "--resume", "auto", "--max-steps", "5", cwd=run_dir)
    assert out.returncode == 0, out.stderr
    assert not list(ck.glob(".tmp-*"))


def test_an_emergency_save_over_its_budget_skips_only_the_read_back(run_dir: Path, reference: Path) -> None:
    # A budget no save can meet: once a save has been timed, the emergency save skips its read-back
    # (SIGKILL follows SIGTERM on preemption). Its digest is still in the footer and checked on load.
    proc = start(run_dir, "--emergency-budget", "0.001")
    wait_for_step(run_dir, 9, proc)  # rolling saves at 4 and 8 have measured the write speed
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "skipping its read-back verification" in " ".join(err.split())
    (emergency,) = (run_dir / "checkpoints").glob("emergency_step_*.pt")
    verify_file(emergency)
    run_train("--data", "corpus.txt", *ARGS, "--resume", "latest", cwd=run_dir, check=True)
    assert_same_run(run_dir, reference)
