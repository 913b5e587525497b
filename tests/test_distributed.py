"""torchrun with 2 CPU ranks (gloo): one log, one layout, coordinated signals, exact resume (SPEC §8)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train_improved.checkpoint import CheckpointManager, CheckpointOptions, read_footer, verify_file
from train_improved.checkpoint.fileformat import ShardsOnMirrorError, hash_file
from train_improved.checkpoint.sharded import load_model_state
from train_improved.listing import collect

from conftest import CORPUS_BYTES, TINY, corpus_bytes, read_metrics, step_losses, wait_for_step

pytestmark = pytest.mark.distributed

STEPS = 30
ARGS = ["--data", "corpus.txt", *TINY, "--max-steps", str(STEPS), "--num-epochs", "20"]
# FSDP2 with 2 micro-batches per rank per step, so gradient sync is switched off and on again.
FSDP = ["--fsdp", "--batch-size", "16"]


def torchrun(*args: str, max_restarts: int = 0) -> list[str]:
    # --standalone: a rendezvous on a free local port, so parallel or back-to-back runs never collide.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "--max-restarts", str(max_restarts), "-m", "train_improved", *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(torchrun(*args), cwd=cwd, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ddp_reference")
    (d / "corpus.txt").write_bytes(corpus_bytes(CORPUS_BYTES * 2))
    run(d, *ARGS)
    return d


@pytest.fixture(scope="module")
def fsdp_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fsdp_reference")
    (d / "corpus.txt").write_bytes(corpus_bytes(CORPUS_BYTES * 2))
    run(d, *ARGS, *FSDP)
    return d


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = run_dir / "checkpoints" / "latest.pt"
    if latest.is_dir():
        verify_file(latest)
        return load_model_state(latest)
    return torch.load(latest, weights_only=True)["model"]


def stop_with_sigterm(cwd: Path, *args: str) -> str:
    """Start a 2-rank run, SIGTERM the torchrun launcher at a random step, return its stderr."""
    target = random.randint(4, 20)
    proc = subprocess.Popen(torchrun(*args), cwd=cwd, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_step(cwd / "runs" / "metrics.jsonl", target, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0, err[-2000:]
    return err


def test_two_ranks_log_once_and_write_the_single_process_layout(reference: Path) -> None:
    steps = [r["step"] for r in read_metrics(reference / "runs" / "metrics.jsonl") if r["event"] == "step"]
    assert steps == list(range(1, STEPS + 1))
    names = {p.name for p in (reference / "checkpoints").glob("*.pt")}
    assert {"latest.pt", "latest_backup.pt", "rolling_last_backup.pt", "best_model.pt", "best_model_backup.pt",
            "epoch_00000.pt"} <= names
    state = torch.load(reference / "checkpoints" / "latest.pt", weights_only=True)
    # Nothing in it belongs to one rank: the data position is global, dropout seeds derive from the step.
    assert state["world_size"] == 2 and "rank_states" not in state
    assert state["dataloader_state"]["train_index"] % 8 == 0  # whole global batches of 8 windows


def test_torchrun_max_restarts_recovers_from_a_killed_rank_by_itself(reference: Path, tmp_path: Path) -> None:
    """`torchrun --max-restarts 2 ... --resume auto`, one of the two ranks killed with SIGKILL: the agent
    restarts the group, every rank resumes from the newest checkpoint, and the run ends as the
    uninterrupted one (every loss and the final weights bitwise). TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    is what the docs tell users to set: with torch's default, a restarted group can read the failed
    group's addresses from the shared store (connection refused, or a hang in gloo's connect)."""
    (tmp_path / "corpus.txt").write_bytes(corpus_bytes(CORPUS_BYTES * 2))
    agent = subprocess.Popen(torchrun(*ARGS, "--resume", "auto", max_restarts=2), cwd=tmp_path,
                             env={**env(), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "runs" / "metrics.jsonl"
    wait_for_step(metrics, random.randint(6, 24), agent)  # seeded: conftest.TEST_SEED
    workers = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(random.choice(workers)), signal.SIGKILL)  # one rank dies without a word
    _, err = agent.communicate(timeout=300)
    assert agent.returncode == 0, err[-3000:]
    assert [r["event"] for r in read_metrics(metrics)].count("resume") == 1  # restarted once, by the agent
    assert step_losses(metrics) == step_losses(reference / "runs" / "metrics.jsonl")
    expected = final_weights(reference)
    assert all(torch.equal(final_weights(tmp_path)[k], v) for k, v in expected.items())


def test_restarts_that_share_torchruns_store_are_warned_about(monkeypatch: pytest.MonkeyPatch) -> None:
    from train_improved.distributed import restarts_can_meet_stale_addresses

    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    assert restarts_can_meet_stale_addresses()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    assert not restarts_can_meet_stale_addresses()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    assert not restarts_can_meet_stale_addresses()


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_sigterm_to_torchrun_then_resume_is_exact(mode: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    # The sharded run also loses its machine: it resumes from its (file://) mirror alone.
    extra = [*FSDP, "--mirror", f"file://{tmp_path / 'bucket'}"] if mode == "fsdp" else []
    reference = request.getfixturevalue("fsdp_reference" if mode == "fsdp" else "reference")
    (tmp_path / "corpus.txt").write_bytes((reference / "corpus.txt").read_bytes())
    err = stop_with_sigterm(tmp_path, *ARGS, *extra)
    emergency = list((tmp_path / "checkpoints").glob("emergency_step_*.pt"))
    assert len(emergency) == 1, err[-3000:]
    stopped = read_footer(tmp_path / "checkpoints" / "latest.pt")
    assert stopped["kind"] == "emergency" and stopped["step"] < STEPS
    if mode == "fsdp":
        manifest = json.loads((tmp_path / "bucket" / "manifest.json").read_text())["entries"]
        assert manifest["latest.pt"]["step"] == stopped["step"] and "__1_0.distcp" in manifest["latest.pt"]["files"]
        shutil.rmtree(tmp_path / "checkpoints")

    out = run(tmp_path, *ARGS, *extra, "--resume", "latest")
    if mode == "fsdp":
        assert "downloaded emergency_step_" in " ".join(out.stderr.split()), out.stderr[-3000:]
    metrics = tmp_path / "runs" / "metrics.jsonl"
    assert step_losses(metrics) == step_losses(reference / "runs" / "metrics.jsonl")
    ours, theirs = final_weights(tmp_path), final_weights(reference)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_fsdp_checkpoints_are_directories_under_the_same_names(fsdp_reference: Path) -> None:
    steps = [r["step"] for r in read_metrics(fsdp_reference / "runs" / "metrics.jsonl") if r["event"] == "step"]
    assert steps == list(range(1, STEPS + 1))
    d = fsdp_reference / "checkpoints"
    names = {p.name for p in d.glob("*.pt")}
    assert {"latest.pt", "latest_backup.pt", "rolling_last_backup.pt", "best_model.pt", "best_model_backup.pt",
            "epoch_00000.pt"} <= names
    assert all((d / n).is_dir() for n in names) and not list(d.glob(".tmp-*"))
    files = {p.name for p in (d / "latest.pt").iterdir()}
    assert {"state.pt", ".metadata", "__0_0.distcp", "__1_0.distcp"} <= files
    state = torch.load(d / "latest.pt" / "state.pt", weights_only=True)  # the non-sharded rest, plain torch
    assert state["sharded"] and state["world_size"] == 2 and "model" not in state
    listing = subprocess.run([sys.executable, "-m", "train_improved", "--list-checkpoints", "--verify", "--json"],
                             cwd=fsdp_reference, capture_output=True, text=True)
    assert listing.returncode == 0, listing.stderr
    assert {r["status"] for r in json.loads(listing.stdout)["checkpoints"]} == {"verified"}


def test_resuming_a_sharded_run_without_fsdp_is_refused(fsdp_reference: Path, tmp_path: Path) -> None:

    shutil.copytree(fsdp_reference, tmp_path / "r")
    proc = subprocess.run(torchrun(*ARGS, "--no-fsdp", "--resume", "latest", "--max-steps", "40"), cwd=tmp_path / "r",
                          env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "incompatible change (--fsdp True -> False)" in proc.stderr
    assert "/train_improved/" not in proc.stderr  # no traceback of ours (torchrun prints its own ChildFailedError)


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, or None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0], int(fields[1])


def kill_job(launcher: subprocess.Popen[bytes]) -> None:
    """SIGKILL torchrun and every worker at once, as a preemption does, and wait until all are dead.

    torchrun starts each worker in its own session, so killing torchrun (or its process group)
    alone leaves the workers running, still holding the checkpoint directory's lock.
    """
    family, frontier = [launcher.pid], [launcher.pid]
    while frontier:
        parents, frontier = set(frontier), []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and (st := _proc_stat(int(entry.name))) and st[1] in parents:
                frontier.append(int(entry.name))
        family += frontier
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    launcher.wait()
    deadline = time.monotonic() + 30
    while any((st := _proc_stat(pid)) and st[0] != "Z" for pid in family):  # a worker in a syscall dies on return
        assert time.monotonic() < deadline, "a worker survived SIGKILL for 30 s"
        time.sleep(0.01)


# ~37 MB of sharded state, saved every 3 steps: kills land in shard writes, commits and rotation.
# 200 steps: with the shards written in the background a life trains faster, and 6 kills must land.
HEAVY_FSDP = ["--data", "corpus.txt", "--n-layer", "4", "--n-head", "4", "--n-embd", "256", "--block-size", "32",
              "--batch-size", "4", "--mini-batch-size", "2", "--dropout", "0.1", "--eval-interval", "7",
              "--eval-steps", "2", "--checkpoint-freq", "3", "--keep-checkpoints", "2", "--sample-length", "0",
              "--seed", "3", "--num-epochs", "100", "--max-steps", "200", "--fsdp"]
FSDP_KILLS = 6


@pytest.mark.faults
def test_kill_dash_9_of_a_sharded_run_then_resume_is_exact(tmp_path: Path) -> None:
    ref, vic = tmp_path / "reference", tmp_path / "victim"
    for d in (ref, vic):
        d.mkdir()
        (d / "corpus.txt").write_bytes(corpus_bytes(CORPUS_BYTES * 4))
    run(ref, *HEAVY_FSDP)
    rng = random.Random(random.getrandbits(64))  # seeded: conftest.TEST_SEED
    kills = 0
    while kills < FSDP_KILLS:
        log = tmp_path / f"life_{kills}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(torchrun(*HEAVY_FSDP, "--resume", "auto"), cwd=vic, env=env(),
                                    stdout=out, stderr=subprocess.STDOUT)
        time.sleep(rng.uniform(4.0, 7.0))  # start-up takes ~3 s
        if proc.poll() is not None:
            assert proc.returncode == 0, log.read_text()[-3000:]
            break
        kill_job(proc)
        kills += 1
        for p in (vic / "checkpoints").glob("*.pt"):  # every checkpoint at a final name is whole
            verify_file(p)
    assert kills == FSDP_KILLS, f"only {kills} kills landed before the run finished"
    run(vic, *HEAVY_FSDP, "--resume", "auto")
    ck = vic / "checkpoints"
    assert not list(ck.glob(".tmp-*"))
    assert step_losses(vic / "runs" / "metrics.jsonl") == step_losses(ref / "runs" / "metrics.jsonl")
    ours, theirs = final_weights(vic), final_weights(ref)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_a_shard_write_failing_on_one_rank_reaches_every_rank_and_the_next_save_commits(tmp_path: Path) -> None:
    worker = Path(__file__).parent / "shard_failure_worker.py"
    proc = subprocess.run([*torchrun()[:-2], str(worker), str(tmp_path / "ck")], env=env(), capture_output=True,
                          text=True, timeout=120)  # a hang fails here instead of blocking the suite
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    # DCP passes rank 1's failure to every rank; the store says it once, with the ranks that saw it.
    assert any(line.startswith("step 1: ") and "1: writing the shards failed: Is a directory (EISDIR)" in line
               for line in lines), proc.stdout
    assert "step 2: committed" in lines and "latest step 2" in lines
    assert not list((tmp_path / "ck").glob(".tmp-*"))


def test_shards_uploaded_by_the_rank_that_wrote_them_and_collected_when_the_mirror_fails(tmp_path: Path) -> None:
    """Nodes with disks of their own and a mirror (ShardWriter(upload=)), two ranks with a staging directory
    each: a save during an outage of rank 1's mirror is collected on rank 0 (whole here), the next one
    leaves rank 1's shard only on the bucket (listed as such), and a restore fetches it from there."""
    worker = Path(__file__).parent / "shard_upload_worker.py"
    ck, bucket = tmp_path / "ck", f"file://{tmp_path / 'bucket'}"
    proc = subprocess.run([*torchrun()[:-2], str(worker), str(ck), bucket], env=env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["step 1: committed", "step 2: committed"], proc.stdout
    assert "uploading shard file __1_0.distcp to the mirror failed: OSError" in proc.stderr
    assert "rank 0 collects this save's shards instead" in proc.stderr
    verify_file(ck / "rolling_step_000001.pt")  # collected: whole here
    listed = read_footer(ck / "latest.pt")["shards"]
    assert {n for n, f in listed.items() if f.get("on_mirror")} == {"__1_0.distcp"}
    with pytest.raises(ShardsOnMirrorError):
        verify_file(ck / "latest.pt")
    assert hash_file(tmp_path / "bucket" / "objects" / f"{listed['__1_0.distcp']['digest']}.shard") == \
        listed["__1_0.distcp"]["digest"]
    assert not any(p.is_file() for p in (tmp_path / "own_disk_1").rglob("*"))  # uploaded, then removed
    rows = {r["name"]: r["status"] for r in collect(ck, verify=True)["checkpoints"]}
    assert rows["rolling_step_000001.pt"] == "verified"
    assert rows["rolling_step_000002.pt"].startswith("verified here; holds 2 of its 3 shard files here"), rows

    with CheckpointManager(ck, CheckpointOptions(mirror=bucket)) as m:
        state, info = m.restore("latest")
    assert state["step"] == 2 and info.step == 2
    assert verify_file(ck / "latest.pt")["step"] == 2  # whole here now: fetched and verified
