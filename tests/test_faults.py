"""Fault injection against the real program: kill -9 torture, damaged and hostile files, full and
failing disks, syscall order, concurrent processes. Marked `faults`; they run in CI too.

The figures of the last run are recorded in benchmarks/RELIABILITY.md.
"""

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

from train_improved.checkpoint import storage, verify_file
from train_improved.save_points import EXIT_NOT_DURABLE

from conftest import CORPUS_BYTES, TINY, corpus_bytes, invoke_train, run_train, step_losses, train_in_process

pytestmark = pytest.mark.faults

# A state of ~25 MB (3.1 M parameters + AdamW moments), so saves take a noticeable time and kills
# land inside them; small batches keep the steps themselves quick.
HEAVY = ["--n-layer", "4", "--n-head", "4", "--n-embd", "256", "--block-size", "32", "--batch-size", "4",
         "--mini-batch-size", "2", "--dropout", "0.1", "--eval-interval", "7", "--eval-steps", "2",
         "--checkpoint-freq", "3", "--keep-checkpoints", "2", "--sample-length", "0", "--seed", "3",
         "--num-epochs", "100"]
TORTURE_STEPS = 400  # ~10-20 steps per life: the run outlasts every kill
KILLS = 20


def final_weights(ck: Path) -> dict[str, torch.Tensor]:
    return torch.load(ck / "latest.pt", weights_only=True)["model"]


def start(cwd: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "train_improved", *args], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_kill_dash_9_torture(tmp_path: Path) -> None:
    args = ["--data", "corpus.txt", *HEAVY, "--max-steps", str(TORTURE_STEPS)]
    ref, vic = tmp_path / "reference", tmp_path / "victim"
    for d in (ref, vic):
        d.mkdir()
        (d / "corpus.txt").write_bytes(corpus_bytes(CORPUS_BYTES * 4))
    run_train(*args, cwd=ref, check=True)

    rng = random.Random(random.getrandbits(64))  # seeded: conftest.TEST_SEED
    kills = 0
    while kills < KILLS:
        proc = start(vic, *args, "--resume", "auto")
        time.sleep(rng.uniform(1.5, 3.5))  # start-up takes ~1.5 s: kills land in steps, saves and rotation
        if proc.poll() is not None:
            break  # the run finished before this kill
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        ck = vic / "checkpoints"
        for p in ck.glob("*.pt"):  # after every kill: each file at a final name is whole and verified
            verify_file(p)
    assert kills == KILLS, f"only {kills} kills landed before the run finished"
    run_train(*args, "--resume", "auto", cwd=vic, check=True)
    ck = vic / "checkpoints"
    assert not list(ck.glob(".tmp-*"))
    for p in ck.glob("*.pt"):
        verify_file(p)
        torch.load(p, weights_only=True)
    assert step_losses(vic / "runs" / "metrics.jsonl") == step_losses(ref / "runs" / "metrics.jsonl")
    ours, theirs = final_weights(ck), final_weights(ref / "checkpoints")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    (tmp_path / "torture.txt").write_text(f"{kills} kills survived\n")
    print(f"\nkill -9 torture: {kills} kills survived, final weights bitwise equal")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("finished")
    (d / "corpus.txt").write_bytes(corpus_bytes(CORPUS_BYTES))
    run_train("--data", "corpus.txt", *TINY, "--max-steps", "24", "--num-epochs", "5", cwd=d, check=True)
    return d


def damage(path: Path, how: str) -> None:
    size = path.stat().st_size
    data = bytearray(path.read_bytes())
    footer_start = storage.read_footer(path)["payload_bytes"]
    path.unlink()  # break hard links: only this name is damaged
    if how == "truncate_1":
        data = data[:1]
    elif how == "truncate_half":
        data = data[: size // 2]
    elif how == "truncate_last_byte":
        data = data[:-1]
    elif how == "flip_header":
        data[12] ^= 0x40
    elif how == "flip_tensor":
        data[size // 2] ^= 0x01
    elif how == "flip_metadata":
        data[footer_start + 3] ^= 0x20
    elif how == "zero_length":
        data = bytearray()
    elif how == "foreign":
        data = bytearray(b"PK\x03\x04 definitely not a checkpoint" * 50)
    if how == "directory":
        path.mkdir()
    else:
        path.write_bytes(bytes(data))


DAMAGES = ["truncate_1", "truncate_half", "truncate_last_byte", "flip_header", "flip_tensor", "flip_metadata",
           "zero_length", "foreign", "directory"]


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_latest_is_named_and_skipped(finished_run: Path, tmp_path: Path, how: str, monkeypatch) -> None:
    run = tmp_path / "r"
    shutil.copytree(finished_run, run)
    damage(run / "checkpoints" / "latest.pt", how)
    listing = invoke_train("--list-checkpoints", "--verify", "--json", cwd=run, monkeypatch=monkeypatch)
    assert listing.exit_code == 1 and '"name": "latest.pt"' in listing.stdout and "BAD" in listing.stdout
    code, err = train_in_process("--data", "corpus.txt", *TINY, "--max-steps", "26", "--num-epochs", "5",
                                 "--resume", "latest", cwd=run, monkeypatch=monkeypatch)
    assert code == 0, err
    text = " ".join(err.split())
    assert "latest.pt failed verification" in text and "resuming from" in text and "at step 24" in text


@pytest.mark.parametrize("name", ["best_model.pt", "rolling_last_backup.pt", "epoch_00000.pt", "latest_backup.pt"])
def test_each_file_kind_is_verified_when_listed(finished_run: Path, tmp_path: Path, name: str) -> None:
    ck = tmp_path / "ck"
    shutil.copytree(finished_run / "checkpoints", ck)
    damage(ck / name, "flip_tensor")
    out = run_train("--list-checkpoints", "--verify", "--json", "--checkpoint-dir", str(ck), cwd=tmp_path)
    bad = [line for line in out.stdout.splitlines() if "BAD" in line]
    assert out.returncode == 1 and len(bad) == 1 and "checksum mismatch" in bad[0]


def test_best_falls_back_to_its_backup(finished_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "r"
    shutil.copytree(finished_run, run)
    damage(run / "checkpoints" / "best_model.pt", "truncate_half")
    out = run_train("--data", "corpus.txt", *TINY, "--max-steps", "26", "--num-epochs", "5", "--resume", "best",
                    cwd=run)
    assert out.returncode == 0 and "best_model.pt failed verification" in " ".join(out.stderr.split())


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {Evil.marker}",))


def test_hostile_pickle_never_runs_anywhere(finished_run: Path, tmp_path: Path) -> None:
    from test_storage import forge

    run = tmp_path / "r"
    shutil.copytree(finished_run, run)
    Evil.marker = tmp_path / "PWNED"
    evil = run / "checkpoints" / "latest.pt"
    evil.unlink()
    forge(evil, {"model": Evil()}, step=24)  # posing as the newest state, so the chain tries it first
    resumed = run_train("--data", "corpus.txt", *TINY, "--max-steps", "26", "--num-epochs", "5",
                        "--resume", "latest", cwd=run)
    assert resumed.returncode == 0 and "needs arbitrary code" in " ".join(resumed.stderr.split())
    # The run above replaced latest.pt; a second forgery outside the store serves the other doors.
    outside = tmp_path / "evil.pt"
    forge(outside, {"model": Evil(), "args": {}})
    explicit = run_train("--data", "corpus.txt", *TINY, "--resume", str(outside), cwd=run)
    assert explicit.returncode == 1 and "needs arbitrary code" in " ".join(explicit.stderr.split())
    assert "Traceback" not in explicit.stderr
    shutil.copy(outside, run / "checkpoints" / "rolling_step_000099.pt")
    listing = run_train("--list-checkpoints", "--verify", "--json", cwd=run)
    assert listing.returncode == 1 and "Traceback" not in listing.stderr
    statuses = {r["name"]: r["status"] for r in json.loads(listing.stdout)["checkpoints"]}
    assert statuses["rolling_step_000099.pt"].startswith("BAD") and "arbitrary code" in statuses["rolling_step_000099.pt"]
    tool = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "tools" / "generate_resume_command.py"),
                           str(outside), "--compare", "--lr", "0.1"], cwd=run, capture_output=True, text=True)
    assert "Traceback" not in tool.stderr
    assert not Evil.marker.exists()


def test_path_like_resume_names_cannot_reach_outside(finished_run: Path, tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "r"
    shutil.copytree(finished_run, run)
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").glob("*.pt")}
    for name in ("../../precious.txt", "../precious.txt", str(outside), "/etc/passwd"):
        code, err = train_in_process("--data", "corpus.txt", *TINY, "--resume", name, cwd=run, monkeypatch=monkeypatch)
        assert code == 1 and "Traceback" not in err, err
    assert outside.read_text() == "keep me"
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").glob("*.pt")} == before


def _mount(args: list[str]) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a filesystem needs root")
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"mount not allowed here: {proc.stderr.strip()}")


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    _mount(["-t", "tmpfs", "-o", "size=128m", "tmpfs", str(mnt)])
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_filling_up_mid_run_is_survived(small_tmpfs: Path, tmp_path: Path) -> None:
    (tmp_path / "corpus.txt").write_bytes(corpus_bytes(CORPUS_BYTES * 4))
    # ~37 MB per file and two files per rolling or best save: the first save fits in 128 MB, later ones don't.
    out = run_train("--data", "corpus.txt", *HEAVY, "--max-steps", "20", "--checkpoint-dir", str(small_tmpfs),
                    cwd=tmp_path)
    assert "Traceback" not in out.stderr
    text = " ".join(out.stderr.split())
    assert "not enough free space" in text or "No space left on device" in text
    latest = verify_file(small_tmpfs / "latest.pt")
    assert latest["step"] > 0
    if latest["step"] < 20:  # the final state did not fit: not "done", and the last durable step is named
        assert out.returncode == EXIT_NOT_DURABLE, out.stderr
        assert f"the last durable checkpoint is step {latest['step']}" in text and "done:" not in text
    else:
        assert out.returncode == 0, out.stderr
    torch.load(small_tmpfs / "latest.pt", weights_only=True)
    assert not list(small_tmpfs.glob(".tmp-*"))


def test_read_only_checkpoint_dir_is_refused_before_training(tmp_path: Path, text_file: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    _mount(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)])
    try:
        out = run_train("--data", str(text_file), *TINY, "--checkpoint-dir", str(ro), cwd=tmp_path)
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)
    assert out.returncode == 1 and "not writable" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("errno_name", ["EIO", "ENOSPC"])
def test_injected_fsync_errors_in_a_real_process(tmp_path: Path, text_file: Path, errno_name: str) -> None:
    if not shutil.which("strace"):
        pytest.skip("strace is not installed")
    # Fail the 5th and 6th fsync of the process: inside the first saves.
    cmd = ["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"inject=fsync:error={errno_name}:when=5..6",
           sys.executable, "-m", "train_improved", "--data", str(text_file), *TINY, "--max-steps", "16",
           "--num-epochs", "5"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert "was not saved" in " ".join(out.stderr.split())
    ck = tmp_path / "checkpoints"
    assert torch.load(ck / "latest.pt", weights_only=True)["step"] == 16
    assert not list(ck.glob(".tmp-*"))


def test_syscall_order_of_a_real_save(tmp_path: Path, text_file: Path) -> None:
    """Every committed file is fsynced and read back before its rename, the directory fsynced right after it, and
    old files are deleted only once the new latest is durable."""
    if not shutil.which("strace"):
        pytest.skip("strace is not installed")
    log = tmp_path / "trace.txt"
    cmd = ["strace", "-f", "-qq", "-e", "trace=openat,fsync,mmap,rename,renameat,renameat2,unlink,unlinkat,link,linkat",
           "-o", str(log), sys.executable, "-m", "train_improved", "--data", str(text_file), *TINY,
           "--max-steps", "8", "--keep-checkpoints", "1"]
    subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True, timeout=300)
    fd_path: dict[str, str] = {}  # threads share descriptors: key by fd alone (one process)
    synced: set[str] = set()
    read_back: set[str] = set()  # the read-back maps each range of the file it checks (checkpoint/stream.py)
    events = []
    unfinished: dict[str, str] = {}  # a thread's call that strace split around another thread's
    for line in log.read_text().splitlines():
        pid, _, call = line.partition(" ")
        call = call.strip()
        if call.endswith("<unfinished ...>"):
            unfinished[pid] = call.removesuffix("<unfinished ...>").rstrip()
            continue
        if call.startswith("<... ") and " resumed>" in call:
            call = unfinished.pop(pid, "") + call.split(" resumed>", 1)[1]
        if call.startswith("openat(") and "= " in call and '"' in call:
            fd_path[call.rsplit("= ", 1)[1].split()[0]] = call.split('"')[1]
        elif call.startswith("fsync("):
            path = fd_path.get(call[6:].split(")")[0], "?")
            if Path(path).name == "checkpoints":
                events.append(("fsync", "dir"))
            elif ".tmp-" in path:
                events.append(("fsync", Path(path).name))
                if call.endswith("= 0"):
                    synced.add(Path(path).name)
        elif call.startswith("mmap(") and ", MAP_SHARED, " in call:
            path = fd_path.get(call.split(", MAP_SHARED, ")[1].split(",")[0], "?")
            if ".tmp-" in path:
                read_back.add(Path(path).name)
        elif call.startswith(("rename", "renameat")) and ".tmp-" in call:
            src, dst = call.split('"')[1], call.split('"')[3]
            events.append(("rename", Path(src).name, Path(dst).name, Path(src).name in read_back))
        elif call.startswith("unlink") and "rolling_step_" in call and call.endswith("= 0"):
            events.append(("unlink", Path(call.split('"')[1]).name))
    renames = [e for e in events if e[0] == "rename"]
    assert renames, "no committed file seen"
    for i, event in enumerate(events):
        if event[0] != "rename":
            continue
        src, dst, was_read_back = event[1:]
        if not dst.startswith(("latest", "best_model_previous")):  # hard links share an fsynced, verified inode
            assert src in synced, f"{dst} renamed before its temp file was fsynced"
            assert was_read_back, f"{dst} renamed before its temp file was read back"
        assert ("fsync", "dir") in events[i + 1:i + 3], f"directory not fsynced right after {dst}"
    # Retention deletes an old rolling file only once the new latest is renamed in and made durable.
    unlinks = [i for i, e in enumerate(events) if e[0] == "unlink"]
    assert unlinks, "--keep-checkpoints 1 should have pruned something"
    for i in unlinks:
        latest = max(j for j, e in enumerate(events[:i]) if e[0] == "rename" and e[2] == "latest.pt")
        assert ("fsync", "dir") in events[latest + 1:i], f"{events[i][1]} deleted before latest.pt was durable"


def test_second_process_is_refused_and_lister_sees_only_whole_files(tmp_path: Path) -> None:
    (tmp_path / "corpus.txt").write_bytes(corpus_bytes(CORPUS_BYTES * 4))
    proc = subprocess.Popen([sys.executable, "-m", "train_improved", "--data", "corpus.txt", *HEAVY,
                             "--max-steps", "40"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        ck = tmp_path / "checkpoints"
        deadline = time.monotonic() + 60
        while not (ck / "latest.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        second = run_train("--data", "corpus.txt", *HEAVY, "--resume", "auto", cwd=tmp_path)
        assert second.returncode == 1 and "in use by another train process" in second.stderr
        listings = 0
        while proc.poll() is None:
            out = run_train("--list-checkpoints", "--json", cwd=tmp_path)
            assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
            rows = json.loads(out.stdout)["checkpoints"]
            assert rows and all(not r["status"].startswith("BAD") for r in rows), out.stdout
            listings += 1
        assert listings >= 2
    finally:
        proc.kill()
        proc.wait()
