"""The real `train` program: help, bad input (one line, non-zero, no traceback, nothing written)."""

from __future__ import annotations

from pathlib import Path

import pytest

from train_improved.config import OPTION_NAMES

from conftest import TINY, run_train, train_in_process


def test_help_lists_every_option(tmp_path: Path) -> None:
    out = run_train("--help", cwd=tmp_path, env={"COLUMNS": "200"})
    assert out.returncode == 0
    for name in [n for n in OPTION_NAMES if n != "task_options"] + ["resume", "list_checkpoints", "config"]:
        assert f"--{name.replace('_', '-')}" in out.stdout, name


@pytest.mark.parametrize("args, message", [
    (["--data", "does/not/exist.txt"], "no such file or directory"),
    (["--n-embd", "30", "--n-head", "4"], "must be divisible by --n-head"),
    (["--checkpoint-freq", "-1"], "--checkpoint-freq must be a positive"),
    (["--batch-size", "0"], "--batch-size must be a positive"),
    (["--device", "tpu"], "--device must be"),
    (["--config", "missing.toml"], "config file missing.toml does not exist"),
    (["--min-free-space", "lots"], "expected a size like 10GB"),
    (["--resume", "latest"], "no checkpoint to resume from"),
    (["--resume", "./nope.pt"], "no checkpoint named ./nope.pt"),
])
def test_bad_input_is_one_clear_line(tmp_path: Path, text_file: Path, monkeypatch: pytest.MonkeyPatch,
                                     args: list[str], message: str) -> None:
    code, err = train_in_process("--data", str(text_file), *TINY, *args, cwd=tmp_path, monkeypatch=monkeypatch)
    assert code == 1, err
    assert message in " ".join(err.split()), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()
    assert not list((tmp_path / "checkpoints").glob("*.pt")) if (tmp_path / "checkpoints").exists() else True


def test_checkpoint_dir_that_is_a_file_is_refused(tmp_path: Path, text_file: Path) -> None:
    (tmp_path / "ck").write_text("not a dir")
    out = run_train("--data", str(text_file), *TINY, "--checkpoint-dir", "ck", cwd=tmp_path)
    assert out.returncode == 1 and "is a file, not a directory" in out.stderr and "Traceback" not in out.stderr
    assert (tmp_path / "ck").read_text() == "not a dir"


def test_starting_fresh_over_an_existing_run_is_refused(tmp_path: Path, text_file: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["--data", str(text_file), *TINY, "--max-steps", "4"]
    assert train_in_process(*args, cwd=tmp_path, monkeypatch=monkeypatch)[0] == 0
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").iterdir()}
    code, err = train_in_process(*args, cwd=tmp_path, monkeypatch=monkeypatch)
    assert code == 1 and "--resume latest" in err
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").iterdir()} == before


def test_help_groups_the_options_and_shows_defaults_as_users_write_them(tmp_path: Path) -> None:
    out = run_train("--help", cwd=tmp_path, env={"COLUMNS": "200"})
    text = " ".join(out.stdout.split())
    for panel in ("Model", "Data", "Optimization", "Checkpoints", "Mirror (a second tier)", "Logging", "Resume"):
        assert f"─ {panel} ─" in out.stdout, panel
    assert "Transformer blocks. [default: 4]" in text and "(4)" not in text
    assert "[default: 1d]" in text and "[default: 25s]" in text and "86400" not in text
    assert run_train("--version", cwd=tmp_path).stdout.startswith("train_improved ")


def test_a_batch_size_alone_means_no_accumulation(tmp_path: Path, text_file: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from train_improved import config

    cfg = config.resolve(cli={"batch_size": 8}, environ={}, config_file=None)
    assert cfg.mini_batch_size == 8
    assert config.resolve(cli={"batch_size": 8, "mini_batch_size": 4}, environ={}, config_file=None).mini_batch_size == 4
    args = [a for a in TINY]
    del args[args.index("--mini-batch-size"):args.index("--mini-batch-size") + 2]
    code, err = train_in_process("--data", str(text_file), *args, "--batch-size", "2", "--max-steps", "2", cwd=tmp_path,
                                 monkeypatch=monkeypatch)
    assert code == 0, err


def test_what_a_run_says_when_resumed_at_its_end_started_from_weights_or_given_a_wrong_metric(
        tmp_path: Path, text_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["--data", str(text_file), *TINY, "--max-steps", "4"]
    assert train_in_process(*args, cwd=tmp_path, monkeypatch=monkeypatch)[0] == 0
    code, err = train_in_process(*args, "--resume", "latest", cwd=tmp_path, monkeypatch=monkeypatch)
    text = " ".join(err.split())
    assert code == 0 and "nothing to train: the run already ended at step 4 (--max-steps reached)" in text, text
    assert "steps 5-4" not in text
    code, err = train_in_process(*args, "--resume", "latest", "--metric", "accuracy", cwd=tmp_path,
                                 monkeypatch=monkeypatch)
    assert code == 1 and "--metric 'accuracy' is not a metric" in err and "best tracking" not in err, err
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    code, err = train_in_process(*args, "--init-from", str(tmp_path / "checkpoints" / "latest.pt"), cwd=tuned,
                                 monkeypatch=monkeypatch)
    text = " ".join(err.split())
    assert code == 0 and f"weights from {tmp_path / 'checkpoints' / 'latest.pt'} (step 4, run " in text, text
