"""Options: human units, precedence (CLI > env > TOML > checkpoint > defaults), validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from train_improved import config
from train_improved.cli import _normalize_argv
from train_improved.config import ConfigError, format_duration, parse_duration, parse_size
from train_improved.overrides import Effect, classify


def test_human_sizes_and_durations() -> None:
    assert parse_size("10GB") == 10 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size(0) == 0 and parse_size("1.5k") == 1500
    assert parse_duration("24h") == 86400 and parse_duration("90m") == 5400 and parse_duration("30") == 30
    assert [format_duration(s) for s in (86400, 5400, 90, 0.05)] == ["1d", "1.5h", "1.5m", "0.05s"]
    assert all(parse_duration(format_duration(s)) == s for s in (86400, 5400, 90, 0.05, 7 * 86400))
    for bad in ("-1GB", "ten", "5XB"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_precedence_cli_over_env_over_toml_over_checkpoint(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('checkpoint-freq = 11\nkeep_checkpoints = 4\nlr = 0.01\nmin-free-space = "1GiB"\n')
    stored = {"checkpoint_freq": 99, "lr": 0.5, "seed": 42, "n_embd": 64}
    env = {"CHECKPOINT_FREQ": "22", "CHECKPOINT_DIR": "/tmp/env_ck"}
    cfg = config.resolve(cli={"checkpoint_freq": "33"}, environ=env, config_file=str(toml), stored=stored)
    assert cfg.checkpoint_freq == 33  # command line
    assert cfg.checkpoint_dir == "/tmp/env_ck"  # environment
    assert cfg.keep_checkpoints == 4 and cfg.lr == 0.01 and cfg.min_free_space == 2**30  # TOML
    assert cfg.seed == 42 and cfg.n_embd == 64  # the checkpoint's stored args
    assert cfg.n_layer == config.TrainConfig().n_layer  # defaults
    cfg = config.resolve(cli={}, environ=env, config_file=str(toml), stored=stored)
    assert cfg.checkpoint_freq == 22
    cfg = config.resolve(cli={}, environ={}, config_file=str(toml), stored=stored)
    assert cfg.checkpoint_freq == 11


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        config.resolve(cli={"n_embd": 30, "n_head": 4, "checkpoint_freq": "-5", "device": "tpu"},
                       environ={}, config_file=None)
    text = str(err.value)
    assert "--n-embd 30 must be divisible by --n-head 4" in text
    assert "--checkpoint-freq must be a positive" in text and "--device" in text


def test_underscore_spellings_are_aliases() -> None:
    assert _normalize_argv(["--checkpoint_freq", "5", "--keep_checkpoints=3", "--list_checkpoints", "a_b"]) == \
        ["--checkpoint-freq", "5", "--keep-checkpoints=3", "--list-checkpoints", "a_b"]


def test_bad_toml_is_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load_toml(bad)
    (tmp_path / "unknown.toml").write_text("learning_rate = 3")
    with pytest.raises(ConfigError, match="unknown option 'learning_rate'"):
        config.load_toml(tmp_path / "unknown.toml")


def test_the_same_directory_spelled_two_ways_is_no_change(tmp_path: Path, monkeypatch) -> None:
    # A resumed run carries its checkpoint directory as an absolute path; typing it relative is no change.
    monkeypatch.chdir(tmp_path)
    old = {"checkpoint_dir": str(tmp_path / "checkpoints"), "data": "corpus.txt", "lr": 1e-3}
    same = {"checkpoint_dir": "checkpoints", "data": str(tmp_path / "corpus.txt"), "lr": 1e-3}
    assert classify(old, same) == []
    moved = classify(old, {**same, "checkpoint_dir": "elsewhere", "data": "other.txt"})
    assert [(c.option, c.effect) for c in moved] == [("checkpoint_dir", Effect.HARMLESS), ("data", Effect.TRAJECTORY)]
