"""What a real run leaves behind: layout, file contents, metrics, and the operator tools on it."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from train_improved.checkpoint import CheckpointManager
from train_improved.data import TokenWindows
from train_improved.samples import KeyedSamples, SampleOrder

from conftest import CORPUS_BYTES, TINY, corpus_bytes, read_metrics, run_train, step_losses

STEPS = 30  # 12 steps per epoch: epochs 0 and 1 end inside the run
ARGS = ["--data", "corpus.txt", *TINY, "--max-steps", str(STEPS), "--num-epochs", "5"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("run")
    (d / "corpus.txt").write_bytes(corpus_bytes(CORPUS_BYTES))
    run_train(*ARGS, cwd=d, check=True)
    return d


def test_layout_after_several_epochs(run: Path) -> None:
    ck = run / "checkpoints"
    names = {p.name for p in ck.iterdir()}
    assert {"latest.pt", "latest_backup.pt", "rolling_last_backup.pt", "best_model.pt", "best_model_backup.pt",
            "best_model_previous.pt", "epoch_00000.pt", "epoch_00001.pt", "history.jsonl"} <= names
    rolling = sorted(n for n in names if n.startswith("rolling_step_"))
    # --keep-checkpoints 3. The final step is also saved as rolling unless a best save at that step
    # already committed it (then latest.pt is that best file).
    assert len(rolling) == 3 and rolling[-2:] in (["rolling_step_000024.pt", "rolling_step_000028.pt"],
                                                  ["rolling_step_000028.pt", "rolling_step_000030.pt"])
    assert torch.load(ck / "latest.pt", weights_only=True)["step"] == STEPS
    assert not [n for n in names if n.startswith(".tmp-")]
    for twin, backup in (("best_model.pt", "best_model_backup.pt"), (rolling[-1], "rolling_last_backup.pt")):
        assert (ck / twin).read_bytes() == (ck / backup).read_bytes()
    prev = torch.load(ck / "best_model_previous.pt", weights_only=True)
    best = torch.load(ck / "best_model.pt", weights_only=True)
    assert prev["step"] < best["step"] and prev["val_loss"] > best["val_loss"]


SPEC_KEYS = ["step", "epoch", "model", "optimizer", "scheduler", "train_loss", "val_loss", "best_val_loss",
             "rng_state", "dataloader_state", "args", "timestamp", "checkpoint_type", "format_version",
             "torch_version"]


def test_every_file_loads_with_weights_only_in_a_fresh_process(run: Path) -> None:
    script = (
        "import json, sys, torch\n"
        "out = {}\n"
        "for p in sys.argv[1:]:\n"
        "    s = torch.load(p, weights_only=True)\n"
        "    out[p] = {'keys': sorted(s), 'rng': sorted(s['rng_state']), 'data': sorted(s['dataloader_state'])}\n"
        "print(json.dumps(out))\n"
    )
    files = sorted(str(p) for p in (run / "checkpoints").glob("*.pt"))
    proc = subprocess.run([sys.executable, "-I", "-c", script, *files], capture_output=True, text=True, check=True)
    for path, info in json.loads(proc.stdout).items():
        assert set(SPEC_KEYS) <= set(info["keys"]), path
        assert {"python", "numpy", "torch"} <= set(info["rng"])
        assert {"train_curr_pos", "train_curr_shard", "val_curr_pos", "val_curr_shard"} <= set(info["data"])


def test_metrics_file_records_steps_evals_and_checkpoints(run: Path) -> None:
    records = read_metrics(run / "runs" / "metrics.jsonl")
    steps = [r for r in records if r["event"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert {"step", "epoch", "loss", "lr", "tokens_per_s"} <= steps[0].keys()
    assert [r["step"] for r in records if r["event"] == "eval"] == [10, 20, 30]
    ckpts = [r for r in records if r["event"] == "checkpoint"]
    assert {r["kind"] for r in ckpts} == {"rolling", "best", "epoch"}
    assert all({"path", "bytes", "stall_s", "write_s"} <= r.keys() for r in ckpts)
    losses = [r["loss"] for r in steps]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5  # it learns


def test_same_seed_gives_bitwise_identical_losses(tmp_path: Path, run: Path) -> None:
    (tmp_path / "corpus.txt").write_bytes((run / "corpus.txt").read_bytes())
    run_train(*ARGS, cwd=tmp_path, check=True)
    assert step_losses(tmp_path / "runs" / "metrics.jsonl") == step_losses(run / "runs" / "metrics.jsonl")


def micro_batch(order: SampleOrder, k: int, size: int) -> torch.Tensor:
    """The inputs of micro-batch k as the runner's loader reads them (KeyedSamples: the epoch's phase)."""
    keys = [(order.epoch, int(i)) for i in order.micro_batch_indices(k, size)]
    return torch.utils.data.default_collate(KeyedSamples(order.dataset, order.seed).__getitems__(keys))


def test_sampler_position_round_trips_and_every_epoch_reads_every_window_once() -> None:
    shards = [np.arange(1000), np.arange(1000, 1700)]  # every token distinct: a window is known by its first
    windows = TokenWindows(shards, block_size=16, name="train")
    assert len(windows) == (1000 // 16 - 1) + (700 // 16 - 1)
    a = SampleOrder(windows, batch_size=4, seed=3)
    seen, phases = [], set()
    for epoch in range(3):
        for _ in range(a.steps_per_epoch):
            x, y = micro_batch(a, 0, 4)
            assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one token
            assert a.state_dict()["curr_pos"] == int(x[0, 0]) - (1000 if a.state_dict()["curr_shard"] else 0)
            seen += [int(r[0]) for r in x]
            a.advance()
        assert a.epoch == epoch + 1 and a.index == 0
        assert len(set(seen)) == len(seen)  # no window twice in an epoch
        phases |= {s % 16 for s in seen if s < 1000}
        seen = []
    assert len(phases) > 1  # each epoch shifts the grid
    for _ in range(7):
        a.advance()
    b = SampleOrder(windows, batch_size=4, seed=3)
    b.load_state_dict(a.state_dict())
    for _ in range(30):
        for k in range(2):  # two micro-batches of 2: the same windows as one batch of 4
            assert torch.equal(micro_batch(a, k, 2)[0], micro_batch(b, k, 2)[0])
        assert torch.equal(torch.cat([micro_batch(a, 0, 2)[0], micro_batch(a, 1, 2)[0]]), micro_batch(b, 0, 4)[0])
        a.advance(), b.advance()


def test_batches_hold_windows_from_all_over_the_data() -> None:
    # The defect of sequential reading (issue 16): all rows of a batch came from one stretch of text.
    order = SampleOrder(TokenWindows([np.arange(64 * 1000)], block_size=64, name="train"), 32, seed=1)
    starts = sorted(int(row[0]) for row in micro_batch(order, 0, 32)[0])
    assert starts[-1] - starts[0] > 64 * 500  # one step's 32 windows span most of the data


# ------------------------------------------------------------------ operator tools


def test_lister_shows_every_family_and_totals(run: Path, monkeypatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)  # piped, as into a log or a pager: no terminal width
    out = run_train("--list-checkpoints", cwd=run)
    assert out.returncode == 0, out.stderr
    for title in ("Latest", "Best", "Rolling", "Epoch"):
        assert title in out.stdout
    # Every file name is shown whole, on one line, however wide the table gets.
    for path in (run / "checkpoints").glob("*.pt"):
        assert re.search(rf"│ {re.escape(path.name)}[ │]", out.stdout), path.name
    assert "…" not in out.stdout
    assert "storage:" in out.stdout and "total" in out.stdout and "free" in out.stdout


def test_lister_json_lists_every_file_with_step_and_size(run: Path) -> None:
    out = run_train("--list-checkpoints", "--json", cwd=run)
    data = json.loads(out.stdout)
    on_disk = {p.name for p in (run / "checkpoints").glob("*.pt")}
    assert {r["name"] for r in data["checkpoints"]} == on_disk
    assert all(r["step"] is not None and r["bytes"] > 0 for r in data["checkpoints"])
    assert data["total_bytes"] > 0 and data["free_bytes"] > 0


def test_lister_verify_flags_a_flipped_byte(run: Path, tmp_path: Path) -> None:
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(run / "checkpoints", ck)
    victim = ck / "rolling_step_000024.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 1
    victim.write_bytes(bytes(data))
    plain = run_train("--list-checkpoints", "--json", "--checkpoint-dir", str(ck), cwd=tmp_path)
    assert plain.returncode == 0  # footers alone cannot see a flipped tensor byte...
    out = run_train("--list-checkpoints", "--json", "--verify", "--checkpoint-dir", str(ck), cwd=tmp_path)
    assert out.returncode == 1  # ...the checksum can
    bad = {r["name"]: r["status"] for r in json.loads(out.stdout)["checkpoints"] if r["status"].startswith("BAD")}
    assert list(bad) == ["rolling_step_000024.pt"] and "checksum mismatch" in bad["rolling_step_000024.pt"]


def test_lister_on_a_missing_directory_fails_cleanly(tmp_path: Path) -> None:
    out = run_train("--list-checkpoints", "--checkpoint-dir", "nowhere", cwd=tmp_path)
    assert out.returncode == 1 and "does not exist" in out.stderr and "Traceback" not in out.stderr


def resume_command(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(Path(__file__).parents[1] / "tools" / "generate_resume_command.py"),
                           *args], cwd=cwd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})


def test_printed_resume_command_resumes_from_that_step(run: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(run, tmp_path / "r")
    out = resume_command("checkpoints/rolling_step_000024.pt", cwd=tmp_path / "r")
    assert out.returncode == 0, out.stderr
    command = out.stdout.strip().splitlines()[-1]
    words = shlex.split(command)
    assert words[0] == "train" and "--n-embd" in words and "--dropout" in words
    words[words.index("--checkpoint-dir") + 1] = "ck2"  # a fresh directory, so the old latest doesn't interfere
    proc = subprocess.run([sys.executable, "-m", "train_improved", *words[1:]], cwd=tmp_path / "r",
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "at step 24" in proc.stderr


def test_compare_classifies_changes(run: Path) -> None:
    ok = resume_command("checkpoints/latest.pt", "--compare", "--mini-batch-size", "2", cwd=run)
    assert ok.returncode == 0, ok.stderr
    assert "--mini-batch-size" in ok.stdout and "changes the trajectory" in ok.stdout
    assert "--mini-batch-size 2" in ok.stdout.splitlines()[-1]
    bad = resume_command("checkpoints/latest.pt", "--compare", "--n-embd", "64", cwd=run)
    assert bad.returncode == 1 and "incompatible" in bad.stderr + bad.stdout and "Traceback" not in bad.stderr


def test_resuming_from_another_directory_continues_in_the_checkpoints_store(tmp_path: Path) -> None:
    # Started in `start/` with the default relative --checkpoint-dir; resumed (and its command generated)
    # from `elsewhere/`: the run must keep writing into start/checkpoints, not a new ./checkpoints.
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir()
    elsewhere.mkdir()
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(corpus_bytes(CORPUS_BYTES))
    run_train("--data", str(corpus), *TINY, "--max-steps", "8", cwd=start, check=True)
    store = start / "checkpoints"
    out = resume_command(str(store / "latest.pt"), cwd=elsewhere)
    assert out.returncode == 0, out.stderr
    words = shlex.split(out.stdout.strip().splitlines()[-1])
    assert words[words.index("--checkpoint-dir") + 1] == str(store.resolve())
    out = run_train("--resume", str(store / "latest.pt"), "--max-steps", "12", cwd=elsewhere, check=True)
    assert not (elsewhere / "checkpoints").exists()
    with CheckpointManager(store, read_only=True) as m:
        latest = m.latest()
    assert latest is not None and latest.step == 12
    # A directory given explicitly still wins.
    run_train("--resume", str(store / "latest.pt"), "--max-steps", "14", "--checkpoint-dir", "branch",
              cwd=elsewhere, check=True)
    assert (elsewhere / "branch" / "latest.pt").exists()


@pytest.mark.parametrize("content", [None, b"not a checkpoint", b""])
def test_resume_command_refuses_missing_or_foreign_files(tmp_path: Path, content: bytes | None) -> None:
    if content is not None:
        (tmp_path / "x.pt").write_bytes(content)
    out = resume_command(str(tmp_path / "x.pt"), cwd=tmp_path)
    assert out.returncode == 1 and "error:" in out.stderr and "Traceback" not in out.stderr


def test_tensorboard_and_auto_checkpoint_frequency(tmp_path: Path, run: Path) -> None:
    (tmp_path / "corpus.txt").write_bytes((run / "corpus.txt").read_bytes())
    out = run_train("--data", "corpus.txt", *TINY, "--max-steps", "20", "--num-epochs", "5", "--use-tensorboard",
                    "--checkpoint-freq", "auto", "--mtbf", "0.01s", "--eval-interval", "5", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert list((tmp_path / "runs").glob("events.out.tfevents.*"))
    # The interval is printed at the start, and again once the first save's cost is known (Young's
    # interval); rolling saves follow it.
    err = " ".join(out.stderr.split())
    assert "checkpoint interval: every 250 steps until a save has been timed" in err
    assert "(--checkpoint-freq auto, MTBF 0.01s)" in err
    assert re.search(r"checkpoint interval: every \d+ steps \(save cost [0-9.]+s, MTBF 0.01s\)", err)
    rolling = [r for r in read_metrics(tmp_path / "runs" / "metrics.jsonl")
               if r["event"] == "checkpoint" and r["kind"] == "rolling"]
    assert len(rolling) >= 2
