"""Elastic resume (issue 14): a 2-rank run stopped by SIGTERM continues on 1 and on 4 ranks.

Every step after the resume must read exactly the windows the uninterrupted 2-rank run read (none
skipped, none repeated), recorded by tests/elastic_worker.py from inside each rank; the losses
agree to 1e-4 relative (only the floating-point reduction order changes).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CORPUS_BYTES, corpus_bytes, read_metrics, step_losses, wait_for_step

pytestmark = pytest.mark.distributed

WORKER = str(Path(__file__).parent / "elastic_worker.py")
STEPS = 24
# 8 micro-batches of 2 per step: 1, 2, 4 or 8 ranks can share it. Dropout on: each micro-batch's
# masks come from (seed, step, micro-batch), whichever rank computes it.
ARGS = ["--data", "corpus.txt", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
        "--batch-size", "16", "--mini-batch-size", "2", "--dropout", "0.1", "--warmup-steps", "5",
        "--eval-interval", "6", "--eval-steps", "3", "--checkpoint-freq", "4", "--sample-length", "0",
        "--seed", "11", "--max-steps", str(STEPS), "--num-epochs", "20"]


def launch(ranks: int, record: Path, *args: str) -> list[str]:
    record.mkdir(parents=True, exist_ok=True)
    if ranks == 0:  # a plain process, no torchrun
        return [sys.executable, WORKER, str(record), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
            WORKER, str(record), *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run(cwd: Path, ranks: int, *args: str) -> str:
    proc = subprocess.run(launch(ranks, cwd / "record", *args), cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


MICRO_BATCHES = 8  # --batch-size 16 / --mini-batch-size 2


def windows_by_step(record: Path) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """(epoch, index) -> sorted [(phase, window)] read at that step by all ranks together (each micro-batch once).

    Only steps that ran: the first micro-batch of the step after the last is fetched ahead and never used.
    """
    seen: dict[tuple[int, int, int], list[int]] = {}
    for f in record.glob("rank*.jsonl"):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            seen[(r["epoch"], r["index"], r["k"])] = [(r["phase"], w) for w in r["windows"]]
    steps: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for (epoch, index, _), windows in seen.items():
        steps.setdefault((epoch, index), []).extend(windows)
    return {k: sorted(v) for k, v in steps.items() if len(v) == 2 * MICRO_BATCHES}


def stopped_copy(tmp: Path, *extra: str) -> Path:
    d = tmp / "stopped"
    d.mkdir()
    (d / "corpus.txt").write_bytes(corpus_bytes(CORPUS_BYTES * 2))
    proc = subprocess.Popen(launch(2, d / "record", *ARGS, *extra), cwd=d, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_step(d / "runs" / "metrics.jsonl", random.randint(3, 16), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and list((d / "checkpoints").glob("emergency_step_*")), err[-3000:]
    return d


def assert_same_windows_and_losses(resumed: Path, reference: Path, stopped_at: int) -> None:
    ours, theirs = windows_by_step(resumed / "record"), windows_by_step(reference / "record")
    assert len(theirs) == STEPS and len(ours) == STEPS
    for position, windows in theirs.items():
        assert ours.get(position) == windows, f"step at {position} read other windows"
    trained = [r["step"] for r in read_metrics(resumed / "runs" / "metrics.jsonl") if r["event"] == "step"]
    assert trained == list(range(1, STEPS + 1))  # before the stop by the 2-rank run, after it by the new one
    mine, ref = step_losses(resumed / "runs" / "metrics.jsonl"), step_losses(reference / "runs" / "metrics.jsonl")
    for step in range(1, STEPS + 1):
        assert mine[step] == pytest.approx(ref[step], rel=1e-4), step
    assert all(mine[s] == ref[s] for s in range(1, stopped_at + 1))  # the same 2 ranks before the stop


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_a_two_rank_run_resumes_on_other_numbers_of_ranks(tmp_path: Path, mode: str) -> None:
    extra = ["--fsdp"] if mode == "fsdp" else []
    reference = tmp_path / "reference"
    reference.mkdir()
    (reference / "corpus.txt").write_bytes(corpus_bytes(CORPUS_BYTES * 2))
    run(reference, 2, *ARGS, *extra)
    stopped = stopped_copy(tmp_path, *extra)
    stopped_at = json.loads((stopped / "checkpoints" / "history.jsonl").read_text().splitlines()[-1])["step"]
    # --fsdp on one rank still needs torchrun (a process group); DDP's state resumes in a plain process.
    for ranks in ([1] if mode == "fsdp" else [0, 4]):
        d = tmp_path / f"on_{ranks}"
        shutil.copytree(stopped, d)
        err = run(d, ranks, *ARGS, *extra, "--resume", "latest")
        assert "elastic" in " ".join(err.split()), err[-2000:]
        assert_same_windows_and_losses(d, reference, stopped_at)


def test_cuda_rng_states_restore_onto_fewer_devices_than_saved_them(monkeypatch) -> None:
    # An 8-GPU run resumed on a 2-GPU node: each present device gets its own state, the rest are not asked for.
    import torch

    from train_improved import state

    plain = state.as_plain_rng_state(state.snapshot_rng())
    plain["torch_cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.__setitem__(device, int(s[0])))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("one state per saving device"))
    state.restore_rng_state(plain)
    assert restored == {0: 0, 1: 1}
