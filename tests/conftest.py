"""Shared helpers: a small real text corpus and a way to run the real `train` program."""

from __future__ import annotations

import json
import os
import random
import secrets
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Random choices in tests (kill moments, stop steps) come from one seed, printed in the header: a red
# run is replayed with TEST_SEED=<seed> (each test draws from the seed and its own id, so alone or in
# the whole suite, on any worker, it draws the same).
os.environ.setdefault("TEST_SEED", str(secrets.randbelow(2**31)))
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: each test and every process it starts computes on one thread. Two torch
    # processes with two OpenMP threads each on two cores wait on each other's spinning threads (~60x slower).
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
TEST_SEED = int(os.environ["TEST_SEED"])


def pytest_report_header(config: pytest.Config) -> str:
    return f"random choices (kill moments, stop steps): TEST_SEED={TEST_SEED}; set it to replay a run"


@pytest.fixture(autouse=True)
def _seeded_random(request: pytest.FixtureRequest) -> None:
    random.seed(f"{TEST_SEED}:{request.node.nodeid}")

# Small enough to run in a second or two, with dropout and gradient accumulation (2 micro-batches).
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "8",
        "--mini-batch-size", "4", "--dropout", "0.1", "--lr", "3e-3", "--warmup-steps", "5",
        "--eval-interval", "10", "--eval-steps", "2", "--checkpoint-freq", "4", "--keep-checkpoints", "3",
        "--sample-length", "0", "--seed", "7"]


def corpus_bytes(n: int) -> bytes:
    """`n` bytes of real text: the standard library's own sources, in a fixed order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = bytearray()
    for name in ("argparse.py", "textwrap.py", "string.py", "shlex.py", "fractions.py", "heapq.py"):
        out += (stdlib / name).read_bytes()
        if len(out) >= n:
            break
    return bytes(out[:n])


# With TINY (4 x 32 tokens per micro-batch, 2 per step): 3150 training bytes = 24 micro-batches = 12 steps
# per epoch; 350 held-out bytes.
CORPUS_BYTES = 3500
STEPS_PER_EPOCH = 12


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_bytes(corpus_bytes(CORPUS_BYTES))
    return path


def run_train(*args: str, cwd: Path, env: dict[str, str] | None = None, check: bool = False,
              timeout: float = 300) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "train_improved", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def read_metrics(path: Path) -> list[dict]:
    """The parsed records. As the metrics file documents, a line that does not parse (the tail of a file
    a live run is appending to, or a line cut by kill -9) is skipped; step_losses() still demands
    every step, so nothing a comparison needs can go missing unnoticed."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def wait_for_step(metrics: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Return once the run writing `metrics` has logged `step`, has ended, or `timeout` seconds passed."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and any(r["event"] == "step" and r["step"] >= step for r in read_metrics(metrics)):
            return
        time.sleep(0.01)


def step_losses(path: Path) -> dict[int, float]:
    """step -> loss; a step logged twice (after a kill) must have logged the same loss both times."""
    losses: dict[int, float] = {}
    for rec in read_metrics(path):
        if rec["event"] == "step":
            if rec["step"] in losses:
                assert losses[rec["step"]] == rec["loss"], f"step {rec['step']} replayed with a different loss"
            losses[rec["step"]] = rec["loss"]
    return losses


def invoke_train(*args: str, cwd: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201 - click's Result
    """Run `train` in this process (no interpreter start-up: ~10x faster for short runs).

    For tests that need no signal and no second process: the same command line, options and store.
    The result has exit_code, stdout and stderr.
    """
    from typer.testing import CliRunner

    from train_improved.cli import _normalize_argv, train_app

    monkeypatch.chdir(cwd)
    result = CliRunner().invoke(train_app(), _normalize_argv(list(args)), prog_name="train")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def train_in_process(*args: str, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """`invoke_train`'s (exit code, stderr)."""
    result = invoke_train(*args, cwd=cwd, monkeypatch=monkeypatch)
    return result.exit_code, result.stderr


# ---------------------------------------------------------------------- a real S3 endpoint (moto's server)

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class S3:
    """A real S3 endpoint on loopback (moto's ThreadedMotoServer), and its address for --mirror-options."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        self.port = self.server._server.port  # noqa: SLF001 - moto exposes the bound port only here
        self.url = f"http://127.0.0.1:{self.port}"

    def restart(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def options(self, **extra: object) -> str:
        return json.dumps({"endpoint_url": self.url, **extra})

    def store(self, url: str):  # noqa: ANN201 - a RemoteStore
        from train_improved.checkpoint.remote import RemoteStore

        return RemoteStore.open(url, json.loads(self.options()), check_writable=False)


@pytest.fixture(scope="module")
def s3() -> S3:
    """One S3 server per test module, with a bucket named "bucket" (moto keeps buckets for the whole process)."""
    import logging

    pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request
    os.environ.update(CREDENTIALS)
    server = S3()
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=server.url)
    fs.makedirs("bucket", exist_ok=True)
    yield server
    server.server.stop()
