"""Resuming with changed options does what the change table announces (issue 14).

Each option classified by `overrides.EFFECTS` is changed on a resume at step 16 of a 24-step run:
a harmless change leaves every loss bitwise equal, a trajectory change really changes the run, an
incompatible one is refused with one line. These runs are in-process (see `train_in_process`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from train_improved.config import TrainConfig, resolve
from train_improved.overrides import EFFECTS, Effect
from train_improved.trainer import learning_rate

from conftest import CORPUS_BYTES, TINY, corpus_bytes, read_metrics, step_losses, train_in_process

STEPS, RESUME_AT = 24, 16
ARGS = ["--data", "corpus.txt", *TINY, "--max-steps", str(STEPS), "--num-epochs", "10"]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 24-step run; its rolling_step_000016.pt is where every changed resume starts."""
    d = tmp_path_factory.mktemp("base")
    (d / "corpus.txt").write_bytes(corpus_bytes(CORPUS_BYTES))
    (d / "other.txt").write_bytes(corpus_bytes(CORPUS_BYTES * 2)[CORPUS_BYTES:])
    mp = pytest.MonkeyPatch()
    try:
        code, err = train_in_process(*ARGS, "--keep-checkpoints", "10", cwd=d, monkeypatch=mp)
    finally:
        mp.undo()
    assert code == 0, err
    return d


def resumed(base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *change: str) -> tuple[int, str, Path]:
    run = tmp_path / "run"
    shutil.copytree(base, run)
    shutil.rmtree(run / "runs")
    start = run / "checkpoints" / f"rolling_step_{RESUME_AT:06d}.pt"
    code, err = train_in_process(*ARGS, "--keep-checkpoints", "10", "--resume", str(start), *change, cwd=run,
                                 monkeypatch=monkeypatch)
    return code, err, run


# (option, value on resume): each value really differs from the run's in a way the option can show.
CHANGES = {
    "eval_interval": "5", "eval_steps": "3", "checkpoint_freq": "3", "keep_checkpoints": "4",
    "keep_emergency_checkpoints": "2", "keep_best": "2", "metric": "train_loss", "mode": "max", "min_free_space": "1MB",
    "async_save": None, "mtbf": "1h", "emergency_budget": "5s", "log_dir": "logs2", "log_interval": "5s",
    "metrics_file": "other_metrics.jsonl", "use_tensorboard": None, "sample_length": "20",
    "checkpoint_dir": "branch",
    "data": "other.txt", "dropout": "0.2", "batch_size": "16", "mini_batch_size": "2", "lr": "1e-3",
    "min_lr": "1e-5", "warmup_steps": "12", "weight_decay": "0.0", "grad_clip": "0.05", "num_epochs": "1",
    "max_steps": "22", "seed": "8", "dtype": "bfloat16",
    "n_layer": "3", "n_head": "4", "n_embd": "64", "block_size": "16", "vocab_size": "300", "fsdp": None,
    "mirror": "file://mirror",
}
FLAGS = {"async_save": "--no-async-save", "use_tensorboard": "--use-tensorboard", "fsdp": "--fsdp"}
# On a CPU-only machine `--device cpu` is the device `auto` picks, and `--compile` needs minutes of
# inductor compilation: both are classified as trajectory changes but cannot show one here.
# `--mirror-options` is never stored in a checkpoint (it may hold secrets), so no resume sees it change.
# A task's own (its file, its source digest, DataLoader workers) cannot change under the built-in GPT:
# test_tasks.py shows them (generate-resume-command --compare on an edited task file; 0 vs 2 workers).
CANNOT_SHOW = {"device", "compile", "mirror_options", "task", "task_digest", "num_workers"}


def test_every_classified_option_is_covered() -> None:
    assert set(EFFECTS) - {"world_size"} == set(CHANGES) | CANNOT_SHOW


@pytest.mark.parametrize("option", sorted(CHANGES))
def test_a_change_does_what_its_class_announces(base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                option: str) -> None:
    flag = FLAGS.get(option, "--" + option.replace("_", "-"))
    change = [flag] if CHANGES[option] is None else [flag, CHANGES[option]]
    code, err, run = resumed(base, tmp_path, monkeypatch, *change)
    effect = EFFECTS[option]
    text = " ".join(err.split())
    if effect is Effect.INCOMPATIBLE:
        assert code == 1 and "incompatible change" in text and "Traceback" not in err, err
        return
    assert code == 0, err
    assert effect.value in text  # announced in the table
    metrics = run / (CHANGES[option] if option == "metrics_file" else
                     f"{CHANGES[option]}/metrics.jsonl" if option == "log_dir" else "runs/metrics.jsonl")
    ours = step_losses(metrics)
    theirs = {s: v for s, v in step_losses(base / "runs" / "metrics.jsonl").items() if s > RESUME_AT}
    if effect is Effect.HARMLESS:
        assert ours == theirs  # bitwise: the same run
    else:
        assert ours != theirs, f"--{option} changed nothing"  # other losses, or another number of steps


def test_a_new_learning_rate_takes_effect_at_every_step(base: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # The defect: optimizer.load_state_dict brought the old base lr back, so --lr was announced and ignored.
    code, err, run = resumed(base, tmp_path, monkeypatch, "--lr", "1e-3")
    assert code == 0, err
    cfg = resolve(cli={"lr": 1e-3, "warmup_steps": 5}, environ={}, config_file=None)
    logged = {r["step"]: r["lr"] for r in read_metrics(run / "runs" / "metrics.jsonl") if r["event"] == "step"}
    assert sorted(logged) == list(range(RESUME_AT + 1, STEPS + 1))
    for step, lr in logged.items():
        assert lr == learning_rate(cfg, step, STEPS), step  # exactly the new schedule
    # --min-lr follows --lr when not given: the README's `train --resume best --lr 1e-4` must run.
    assert cfg.final_lr == pytest.approx(1e-4)
    code, err, _ = resumed(base, tmp_path / "again", monkeypatch, "--lr", "1e-4")
    assert code == 0, err


@pytest.mark.parametrize("mode", ["min", "max"])
def test_best_follows_the_runs_metric_and_mode_across_a_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               mode: str) -> None:
    # The defect: the resumed store compared train losses against the val_loss stored in best_model.pt.
    (tmp_path / "corpus.txt").write_bytes(corpus_bytes(CORPUS_BYTES))
    args = [*ARGS, "--metric", "train_loss", "--mode", mode, "--eval-interval", "2"]
    code, err = train_in_process(*args, "--max-steps", "12", cwd=tmp_path, monkeypatch=monkeypatch)
    assert code == 0, err
    code, err = train_in_process(*args, "--resume", "latest", cwd=tmp_path, monkeypatch=monkeypatch)
    assert code == 0, err
    history = [json.loads(line) for line in (tmp_path / "checkpoints" / "history.jsonl").read_text().splitlines()]
    bests = [r["metrics"]["train_loss"] for r in history if r["event"] == "save" and r["kind"] == "best"]
    assert len(bests) >= (2 if mode == "min" else 1)  # losses fall: under max the first evaluation stays best
    assert bests == sorted(bests, reverse=mode == "min") and len(set(bests)) == len(bests)
    best = torch.load(tmp_path / "checkpoints" / "best_model.pt", weights_only=True)
    losses = step_losses(tmp_path / "runs" / "metrics.jsonl")
    evaluated = [losses[s] for s in range(2, STEPS + 1, 2)]
    assert best["train_loss"] == (min(evaluated) if mode == "min" else max(evaluated))


def test_auto_checkpoint_interval_survives_a_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "corpus.txt").write_bytes(corpus_bytes(CORPUS_BYTES))
    args = [*ARGS, "--checkpoint-freq", "auto", "--mtbf", "0.05s", "--eval-interval", "3"]
    code, err = train_in_process(*args, "--max-steps", "12", cwd=tmp_path, monkeypatch=monkeypatch)
    assert code == 0, err
    saved = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=True)["checkpoint_freq_auto"]
    assert saved["every"] != 250 and saved["step_time"] > 0 and saved["save_cost"] > 0
    code, err = train_in_process(*args, "--resume", "latest", cwd=tmp_path, monkeypatch=monkeypatch)
    assert code == 0, err
    text = " ".join(err.split())
    assert "until a save has been timed" not in text and "(resumed: save cost" in text
    assert f"checkpoint interval: every {saved['every']} steps (--checkpoint-freq auto" in text  # not 250 again


def test_a_world_size_that_cannot_share_the_batch_names_the_sizes_that_can() -> None:
    from train_improved.config import ConfigError, batch_split

    assert batch_split(16, 2, 4) == 2
    with pytest.raises(ConfigError, match=r"3 ranks cannot share evenly; run on 1, 2, 4, 8 rank\(s\)"):
        batch_split(16, 2, 3)


def test_defaults_still_build() -> None:
    assert TrainConfig().final_lr == pytest.approx(3e-4)


def test_generate_resume_command_proposes_another_number_of_ranks(base: Path) -> None:
    import subprocess
    import sys

    from conftest import ROOT

    tool = [sys.executable, str(ROOT / "tools" / "generate_resume_command.py"),
            str(base / "checkpoints" / "latest.pt"), "--compare"]
    ok = subprocess.run([*tool, "--world-size", "2"], capture_output=True, text=True, env={**__import__("os").environ,
                                                                                           "COLUMNS": "200"})
    assert ok.returncode == 0, ok.stderr
    assert "elastic" in ok.stdout and "the floating-point reduction order changes" in ok.stdout
    assert ok.stdout.strip().splitlines()[-1].startswith("torchrun --nproc_per_node 2 -m train_improved --resume ")
    bad = subprocess.run([*tool, "--world-size", "3"], capture_output=True, text=True)
    assert bad.returncode == 1 and "3 ranks cannot share evenly; run on 1, 2 rank(s)" in bad.stderr
