"""Two nodes without a shared disk (issue 24): each "node" is a torchrun launcher in its own mount
namespace, with its own directory bind-mounted at the same --checkpoint-dir path, the way real nodes
have the same path on different disks. Rank 0 (node 0) writes (under --fsdp after collecting node 1's
shards); node 1 never holds a checkpoint, so a resume there must receive rank 0's over the process group.
"""

from __future__ import annotations

import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train_improved.checkpoint import load_checkpoint, read_footer, verify_file
from train_improved.checkpoint.fileformat import ShardsOnMirrorError
from train_improved.checkpoint.remote import RemoteStore

from conftest import CORPUS_BYTES, TINY, corpus_bytes, run_train, step_losses, wait_for_step

pytestmark = pytest.mark.distributed
STEPS = 24
ARGS = ["--data", "corpus.txt", *TINY, "--max-steps", str(STEPS), "--num-epochs", "10"]


def _can_unshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode == 0


needs_namespaces = pytest.mark.skipif(not _can_unshare(), reason="needs root and unshare --mount")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cwd: Path, node: int, port: int, *args: str, procs: int = 1) -> subprocess.Popen:
    """Node `node` of 2: its own disk (cwd/disk_<node>) at the shared path cwd/ck, `procs` processes."""
    disk, mount_at = cwd / f"disk_{node}", cwd / "ck"
    disk.mkdir(exist_ok=True)
    mount_at.mkdir(exist_ok=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                "--nproc-per-node", str(procs), "--master-addr", "127.0.0.1", "--master-port", str(port),
                "-m", "train_improved", *args, "--checkpoint-dir", str(mount_at)]
    script = f"mount --bind {disk} {mount_at} && exec {shlex.join(map(str, torchrun))}"
    return subprocess.Popen(["unshare", "--mount", "--propagation", "private", "bash", "-c", script], cwd=cwd,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def run_both(cwd: Path, *args: str, stop_at: int | None = None, procs: int = 1) -> list[str]:
    port = free_port()
    nodes = [launch(cwd, node, port, *args, procs=procs) for node in (0, 1)]
    if stop_at is not None:
        wait_for_step(cwd / "runs" / "metrics.jsonl", stop_at, nodes[0])
        nodes[0].send_signal(signal.SIGTERM)  # what a scheduler sends one node's agent
    errs = [p.communicate(timeout=600)[1] for p in nodes]
    return [f"exit {p.returncode}\n{e}" for p, e in zip(nodes, errs, strict=True)]


def reference_and_victim(tmp_path: Path, *args: str, procs: int = 1) -> tuple[Path, Path]:
    """A finished 2-node reference run of `args`, and an empty directory (with the corpus) for the run under test."""
    reference, victim = tmp_path / "reference", tmp_path / "victim"
    for d in (reference, victim):
        d.mkdir()
        (d / "corpus.txt").write_bytes(corpus_bytes(CORPUS_BYTES))
    out = run_both(reference, *args, procs=procs)
    assert all(o.startswith("exit 0") for o in out), out
    return reference, victim


@needs_namespaces
def test_a_ddp_run_on_two_nodes_resumes_when_only_rank_0_holds_the_checkpoint(tmp_path: Path) -> None:
    reference, victim = reference_and_victim(tmp_path, *ARGS)
    out = run_both(victim, *ARGS, stop_at=random.randint(6, 18))  # seeded: conftest.TEST_SEED
    assert out[0].startswith(f"exit {128 + signal.SIGTERM}") or out[0].startswith("exit 1"), out
    assert list((victim / "disk_0").glob("emergency_step_*.pt")) and not any((victim / "disk_1").iterdir())
    out = run_both(victim, *ARGS, "--resume", "latest")
    assert all(o.startswith("exit 0") for o in out), out
    ours, theirs = step_losses(victim / "runs" / "metrics.jsonl"), step_losses(reference / "runs" / "metrics.jsonl")
    assert ours == theirs  # every step, before and after the stop, bitwise
    final = torch.load(victim / "disk_0" / "latest.pt", weights_only=True)["model"]
    expected = torch.load(reference / "disk_0" / "latest.pt", weights_only=True)["model"]
    assert all(torch.equal(final[k], v) for k, v in expected.items())


def launch_alone_under_torchrun(cwd: Path, directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The job relaunched on one fresh node: torchrun with one process (--fsdp needs a process group)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                           "-m", "train_improved", *args, "--checkpoint-dir", str(directory)], cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)


def shard_files(ranks: int = 2) -> set[str]:
    """What a whole sharded checkpoint of `ranks` ranks holds besides state.pt."""
    return {f"__{r}_0.distcp" for r in range(ranks)} | {".metadata"}


def whole_sharded_checkpoints(disk: Path, ranks: int = 2) -> list[str]:
    """The sharded checkpoints of a disk, each verified: its footer lists every rank's shard files."""
    names = []
    for checkpoint in sorted(p for p in disk.iterdir() if p.is_dir() and not p.name.startswith(".")):
        footer = load_checkpoint(checkpoint)[1]  # every listed file present, each digest checked
        assert shard_files(ranks) <= set(footer["shards"]), checkpoint.name
        names.append(checkpoint.name)
    return names


@needs_namespaces
def test_fsdp_on_two_nodes_without_a_shared_disk(s3, tmp_path: Path) -> None:
    """--fsdp on node-local disks, no mirror: rank 0 collects the other node's shards at every save, so node
    0's store holds each checkpoint whole and node 1 keeps nothing. SIGTERM to node 0's agent, then a resume on
    both nodes (node 1 receives the checkpoint from rank 0): every loss bitwise.
    With --mirror, each node uploads its own shards instead and the bucket alone holds checkpoints whole:
    SIGTERM, a resume on both nodes from their disks as they are (node 1's shard fetched from the bucket):
    bitwise; SIGTERM again, both disks lost: the job resumes on one node from the bucket (2 ranks to 1: 1e-4)."""
    fsdp = ["--fsdp", *ARGS]
    reference, victim = reference_and_victim(tmp_path, *fsdp)
    theirs = step_losses(reference / "runs" / "metrics.jsonl")
    out = run_both(victim, *fsdp, stop_at=random.randint(6, 18))  # seeded: conftest.TEST_SEED
    assert out[0].startswith(f"exit {128 + signal.SIGTERM}") or out[0].startswith("exit 1"), out
    assert "rank 0 collects the shards of every save" in out[0]
    assert any(n.startswith("emergency_step_") for n in whole_sharded_checkpoints(victim / "disk_0"))
    assert not any((victim / "disk_1").iterdir())  # no staging directory left behind on node 1
    out = run_both(victim, *fsdp, "--resume", "latest")
    assert all(o.startswith("exit 0") for o in out), out
    assert step_losses(victim / "runs" / "metrics.jsonl") == theirs  # every step, before and after the stop
    assert "latest.pt" in whole_sharded_checkpoints(victim / "disk_0") and not any((victim / "disk_1").iterdir())

    mirrored = tmp_path / "mirrored"
    mirrored.mkdir()
    (mirrored / "corpus.txt").write_bytes(corpus_bytes(CORPUS_BYTES))
    args = [*fsdp, "--mirror", "s3://bucket/fsdp", "--mirror-options", s3.options()]
    first_stop = random.randint(6, 12)
    out = run_both(mirrored, *args, stop_at=first_stop)
    assert out[0].startswith(f"exit {128 + signal.SIGTERM}") or out[0].startswith("exit 1"), out
    assert "each node uploads its shards to the mirror" in out[0], out[0][-3000:]
    assert_each_node_uploaded_its_own(mirrored, s3.store("s3://bucket/fsdp"))
    # Both disks as they are: rank 0 fetches node 1's shard files from the bucket, then node 1 receives the
    # whole checkpoint from rank 0. Stopped again further on.
    out = run_both(mirrored, *args, "--resume", "latest", stop_at=random.randint(first_stop + 3, 20))
    assert out[0].startswith(f"exit {128 + signal.SIGTERM}") or out[0].startswith("exit 1"), out
    assert "shard file(s) written by other nodes from the mirror" in out[0]
    resumed = step_losses(mirrored / "runs" / "metrics.jsonl")
    assert resumed == {step: theirs[step] for step in resumed}, "bitwise, before and after the first stop"
    manifest = assert_each_node_uploaded_its_own(mirrored, s3.store("s3://bucket/fsdp"), resumed=True)
    stopped = manifest["latest.pt"].step
    for disk in ("disk_0", "disk_1"):  # both machines gone
        shutil.rmtree(mirrored / disk)
    again = launch_alone_under_torchrun(mirrored, mirrored / "new_disk", *args, "--resume", "auto",
                                        "--metrics-file", "runs/relaunched.jsonl")
    assert again.returncode == 0, again.stderr[-3000:]
    second_life = step_losses(mirrored / "runs" / "relaunched.jsonl")
    assert sorted(second_life) == list(range(stopped + 1, STEPS + 1))
    for step, loss in second_life.items():  # 1 rank now: only the reduction order differs
        assert loss == pytest.approx(theirs[step], rel=1e-4), step


def assert_each_node_uploaded_its_own(cwd: Path, store: RemoteStore, *, resumed: bool = False) -> dict:
    """With --mirror, node 1 uploads its shard file itself: node 0's disk holds every checkpoint but that file
    (its footer lists it as on the mirror; after a resume, the checkpoint it loaded holds it too, fetched),
    node 1's disk holds nothing, and every checkpoint the bucket lists is whole there (every object present
    with its size). Returns the manifest."""
    assert not any((cwd / "disk_1").iterdir())
    local = sorted(p for p in (cwd / "disk_0").iterdir() if p.is_dir() and not p.name.startswith("."))
    partial = 0
    for checkpoint in local:
        try:
            verify_file(checkpoint)
            assert resumed, f"{checkpoint.name} is whole on node 0, though node 1 uploaded its shard file"
        except ShardsOnMirrorError as e:  # the two files here check out; the third is on the mirror
            assert "holds 2 of its 3 shard files here" in str(e), checkpoint.name
            partial += 1
        listed = read_footer(checkpoint)["shards"]
        assert set(listed) == shard_files() and {n for n, f in listed.items() if f.get("on_mirror")} == {"__1_0.distcp"}
    assert partial, "no checkpoint saved on node-local disks with a mirror"
    manifest = store.manifest()
    assert "latest.pt" in manifest
    for entry in manifest.values():
        assert set(entry.files or {}) == shard_files(), entry.name
        for f in entry.files.values():
            assert store.fs.size(store._path(f["key"])) == f["bytes"], entry.name
    return manifest


@needs_namespaces
def test_fsdp_on_two_nodes_of_two_ranks_each_without_a_shared_disk(tmp_path: Path) -> None:
    """Two ranks per node: rank 1 shares node 0's disk (it loads the checkpoint from there), ranks 2 and 3
    share node 1's (each receives it from rank 0). SIGTERM, resume on both nodes: every loss bitwise."""
    fsdp = ["--fsdp", *ARGS, "--batch-size", "16"]  # 4 micro-batches of 4: one per rank
    reference, victim = reference_and_victim(tmp_path, *fsdp, procs=2)
    out = run_both(victim, *fsdp, stop_at=random.randint(6, 18), procs=2)  # seeded: conftest.TEST_SEED
    assert out[0].startswith(f"exit {128 + signal.SIGTERM}") or out[0].startswith("exit 1"), out
    assert whole_sharded_checkpoints(victim / "disk_0", ranks=4)
    assert not any((victim / "disk_1").iterdir())
    out = run_both(victim, *fsdp, "--resume", "latest", procs=2)
    assert all(o.startswith("exit 0") for o in out), out
    assert step_losses(victim / "runs" / "metrics.jsonl") == step_losses(reference / "runs" / "metrics.jsonl")


@needs_namespaces
def test_fsdp_node_1_lost_mid_run_leaves_only_whole_checkpoints_on_every_tier(s3, tmp_path: Path) -> None:
    """kill -9 of node 1 (its agent and its rank) at a random step, with saves every 2 steps: whatever its
    upload was doing, the bucket lists only checkpoints whose every shard object is there, node 0's store
    only checkpoints whose files here check out and whose other file is node 1's, uploaded, and the job
    relaunched on node 0 alone resumes from its own disk (node 1's shard fetched from the bucket) and finishes."""
    (tmp_path / "corpus.txt").write_bytes(corpus_bytes(CORPUS_BYTES))
    args = ["--fsdp", *ARGS, "--checkpoint-freq", "2", "--mirror", "s3://bucket/fsdplost",
            "--mirror-options", s3.options()]
    port = free_port()
    nodes = [launch(tmp_path, node, port, *args) for node in (0, 1)]
    wait_for_step(tmp_path / "runs" / "metrics.jsonl", random.randint(5, 16), nodes[0])  # seeded: TEST_SEED
    for pid in [*children(nodes[1].pid), nodes[1].pid]:
        os.kill(pid, signal.SIGKILL)
    err = [p.communicate(timeout=300)[1] for p in nodes]
    assert nodes[0].returncode != 0, err[0][-3000:]  # its peer is gone: the job stops
    assert not any((tmp_path / "disk_1").iterdir()) or all(p.name.startswith(".tmp") for p in
                                                           (tmp_path / "disk_1").iterdir())
    local = [p for p in (tmp_path / "disk_0").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert local, "no checkpoint was committed before node 1 was lost"
    for checkpoint in local:
        with pytest.raises(ShardsOnMirrorError, match="holds 2 of its 3 shard files here"):
            verify_file(checkpoint)
    store = s3.store("s3://bucket/fsdplost")
    for entry in store.manifest().values():
        assert set(entry.files or {}) == shard_files(), entry.name
        for f in entry.files.values():
            assert store.fs.size(store._path(f["key"])) == f["bytes"], entry.name
    listed = run_train("--list-checkpoints", "--mirror", "s3://bucket/fsdplost", "--mirror-options", s3.options(),
                       "--verify", "--checkpoint-dir", str(tmp_path / "disk_0"), cwd=tmp_path)
    assert listed.returncode == 0, listed.stdout + listed.stderr

    again = launch_alone_under_torchrun(tmp_path, tmp_path / "disk_0", *args, "--resume", "auto",
                                        "--metrics-file", "runs/relaunched.jsonl")
    assert again.returncode == 0, again.stderr[-3000:]
    assert max(step_losses(tmp_path / "runs" / "relaunched.jsonl")) == STEPS


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def launch_alone(cwd: Path, node: int, *args: str) -> subprocess.CompletedProcess[str]:
    """One process, no torchrun, on node `node`'s disk: the job relaunched on what is left."""
    disk, mount_at = cwd / f"disk_{node}", cwd / "ck"
    command = [sys.executable, "-m", "train_improved", *args, "--checkpoint-dir", str(mount_at)]
    script = f"mount --bind {disk} {mount_at} && exec {shlex.join(map(str, command))}"
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", script], cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)


def mirrored_pair(tmp_path: Path, steps: int, s3, prefix: str) -> tuple[Path, Path, list[str]]:  # noqa: ANN001
    """A finished 2-node reference run without a mirror, an empty directory for the run under test, and
    that run's arguments (mirrored to s3://bucket/<prefix>)."""
    plain = ["--data", "corpus.txt", *TINY, "--max-steps", str(steps), "--num-epochs", "10"]
    reference, victim = reference_and_victim(tmp_path, *plain)
    return reference, victim, [*plain, "--mirror", f"s3://bucket/{prefix}", "--mirror-options", s3.options()]


@needs_namespaces
def test_the_writing_node_lost_then_the_job_resumes_on_the_other_node_alone_from_the_bucket(s3, tmp_path: Path
                                                                                            ) -> None:
    """Node 0 (rank 0, the writer) dies with its disk mid-run; node 1 never held a checkpoint. The job is
    relaunched on node 1 alone: it resumes from the bucket on 1 rank, and the bucket keeps its history."""
    from conftest import read_metrics

    steps = 60  # 12 steps an epoch: epoch files at 12, 24, 36, 48, 60
    reference, victim, args = mirrored_pair(tmp_path, steps, s3, "lostnode")

    port = free_port()
    nodes = [launch(victim, node, port, *args) for node in (0, 1)]
    target = random.randint(8, 24)  # seeded: conftest.TEST_SEED
    metrics = victim / "runs" / "metrics.jsonl"
    import time

    deadline = time.monotonic() + 300
    while not (metrics.exists() and any(r["event"] == "mirror" and (r["mirrored_step"] or 0) >= target
                                        for r in read_metrics(metrics))):
        if time.monotonic() > deadline or nodes[0].poll() is not None:
            raise AssertionError(f"the mirror never reached step {target}: {nodes[0].communicate()[1][-3000:]}")
        time.sleep(0.01)
    workers = {n: children(p.pid) for n, p in enumerate(nodes)}
    for pid in workers[0] + workers[1]:
        os.kill(pid, signal.SIGSTOP)  # both nodes hold still while node 0 is lost
    for pid in [*workers[0], nodes[0].pid]:
        os.kill(pid, signal.SIGKILL)
    for pid in workers[1]:
        os.kill(pid, signal.SIGCONT)  # node 1 finds its peer gone
    for p in nodes:
        p.communicate(timeout=300)
    assert nodes[0].returncode == -signal.SIGKILL and nodes[1].returncode != 0
    first_life = step_losses(metrics)
    assert max(first_life) < steps, "the run ended before node 0 was lost"
    shutil.rmtree(victim / "disk_0")  # the node is gone, and its disk with it
    assert not any((victim / "disk_1").iterdir())
    mirrored = s3.store("s3://bucket/lostnode").manifest()["latest.pt"].step

    again = launch_alone(victim, 1, *args, "--resume", "auto", "--metrics-file", "runs/relaunched.jsonl")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"at step {mirrored}" in again.stderr
    theirs = step_losses(reference / "runs" / "metrics.jsonl")
    assert first_life == {s: theirs[s] for s in first_life}  # the 2-node life, bitwise
    second_life = step_losses(victim / "runs" / "relaunched.jsonl")
    assert sorted(second_life) == list(range(mirrored + 1, steps + 1))
    for step, loss in second_life.items():  # 1 rank now: only the reduction order differs
        assert loss == pytest.approx(theirs[step], rel=1e-4), step
    # Every tier afterwards: node 1's new store and the bucket, whose history the recovery kept.
    assert torch.load(victim / "disk_1" / "latest.pt", weights_only=True)["step"] == steps
    manifest = s3.store("s3://bucket/lostnode").manifest()
    assert manifest["latest.pt"].step == steps
    assert {f"epoch_0000{e}.pt" for e in range(5)} <= set(manifest)


@needs_namespaces
def test_sigterm_to_one_nodes_agent_puts_one_emergency_checkpoint_on_the_bucket(s3, tmp_path: Path) -> None:
    """What a scheduler does at preemption: SIGTERM to node 0's agent. Both nodes stop at the same step, rank 0
    writes one emergency checkpoint and waits for its upload (within --emergency-budget); with both disks gone,
    the bucket alone resumes the job on both nodes, bitwise."""
    reference, victim, args = mirrored_pair(tmp_path, STEPS, s3, "preempted")
    out = run_both(victim, *args, stop_at=random.randint(6, 18))  # seeded: conftest.TEST_SEED
    assert out[0].startswith(f"exit {128 + signal.SIGTERM}") or out[0].startswith("exit 1"), out
    emergency = sorted((victim / "disk_0").glob("emergency_step_*.pt"))
    assert len(emergency) == 1 and not any((victim / "disk_1").iterdir())
    manifest = s3.store("s3://bucket/preempted").manifest()
    assert emergency[0].name in manifest  # uploaded before the process exited
    assert manifest["latest.pt"].digest == manifest[emergency[0].name].digest
    for disk in ("disk_0", "disk_1"):  # both machines gone; new ones have empty disks
        shutil.rmtree(victim / disk)
    out = run_both(victim, *args, "--resume", "auto")
    assert all(o.startswith("exit 0") for o in out), out
    assert step_losses(victim / "runs" / "metrics.jsonl") == step_losses(reference / "runs" / "metrics.jsonl")
    assert s3.store("s3://bucket/preempted").manifest()["latest.pt"].step == STEPS
