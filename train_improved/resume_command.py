"""`generate-resume-command`: the exact `train` command that resumes from a checkpoint.

It reads the checkpoint's footer only (after verifying its checksum): nothing is unpickled, so a
hostile file can never run code here.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from . import config
from .checkpoint import CheckpointError, CorruptCheckpointError, layout, verify_file
from .config import ConfigError, TrainConfig
from .overrides import NOTES, WHY, Change, Effect, classify, incompatible
from .task import locate as locate_task
from .task import source_digest

_STYLE = {Effect.HARMLESS: "green", Effect.ELASTIC: "cyan", Effect.TRAJECTORY: "yellow", Effect.INCOMPATIBLE: "bold red"}
# Flags spelled --x / --no-x: every boolean option.
_NEGATABLE = {f.name for f in dataclasses.fields(config.TrainConfig) if f.type in (bool, "bool")}


def locate(checkpoint: str) -> Path:
    """A path as given, else a name inside $CHECKPOINT_DIR (default ./checkpoints)."""
    path = Path(checkpoint).expanduser()
    if path.exists() or os.sep in checkpoint:
        return path
    return Path(os.environ.get("CHECKPOINT_DIR", "checkpoints")) / checkpoint


def continued_args(args: dict[str, Any], path: Path) -> dict[str, Any]:
    """The options a run resumed from `path` continues with: the saved ones, except that
    `checkpoint_dir` is the store that holds `path` (absolute), when `path` lies in one.

    A saved relative --checkpoint-dir means "relative to where the run was started". Resumed from
    another working directory, it would start a second, empty store there and leave the run's
    history behind; the file's own location says where the run lives wherever the command is typed.
    A lone file outside any store keeps the saved value. Options given explicitly still win.
    """
    store = path.expanduser().parent
    if (store / layout.HISTORY).exists() or (store / layout.LOCK).exists():
        return {**args, "checkpoint_dir": str(store.resolve())}
    return args


def parse_overrides(args: list[str], *, task: bool = False) -> dict[str, Any]:
    """`--lr 1e-3 --no-async-save --compile` -> {"lr": 0.001, "async_save": False, "compile": True}.

    `--world-size N` proposes resuming on N ranks (torchrun --nproc_per_node N). With `task`, options
    train does not know are the task's (`--width 64` -> {"task_options": {"width": "64"}}).
    """
    raw: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"expected --OPTION VALUE pairs, got {arg!r}")
        name, _, inline = arg[2:].partition("=")
        key = name.replace("-", "_")
        if key.startswith("no_") and key[3:] in _NEGATABLE:
            raw[key[3:]] = False
        elif key in _NEGATABLE and not inline:
            raw[key] = True
        elif inline:
            raw[key] = inline
        elif i + 1 < len(args):
            raw[key] = args[i + 1]
            i += 1
        else:
            raise ConfigError(f"--{name} needs a value")
        i += 1
    world = raw.pop("world_size", None)
    if task:
        theirs = {k: raw.pop(k) for k in list(raw) if k not in config.OPTION_NAMES}
        if theirs:
            raw["task_options"] = theirs
    out = config.coerce(raw, "command line")
    if world is not None:
        try:
            out["world_size"] = int(world)
        except ValueError:
            raise ConfigError(f"--world-size needs a whole number of ranks, got {world!r}") from None
        if out["world_size"] < 1:
            raise ConfigError(f"--world-size must be at least 1 (got {world})")
    return out


def command_for(path: Path, args: dict[str, Any]) -> str:
    world = int(args.get("world_size") or 1)
    launcher = ["torchrun", "--nproc_per_node", str(world), "-m", "train_improved"] if world > 1 else ["train"]
    words = [*launcher, "--resume", str(path.resolve())]
    for key, value in args.items():
        if key == "task_options":
            for name, v in value.items():
                flag = "--" + name.replace("_", "-")
                words += [flag if v else "--no-" + flag[2:]] if isinstance(v, bool) else [flag, str(v)]
            continue
        if key not in config.OPTION_NAMES or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if key in _NEGATABLE:
            words.append(flag if value else "--no-" + flag[2:])
        else:
            words += [flag, str(value)]
    return shlex.join(words)


def print_changes(old: dict[str, Any], new: dict[str, Any], *, title: str,
                  console: Console | None = None) -> list[Change]:
    """Show a table of changed options and their effect; raise if any is incompatible."""
    console = console or Console(stderr=True)
    changes = classify(old, new)
    if changes:
        table = Table(title=title, title_justify="left")
        for column in ("option", "checkpoint", "now", "effect"):
            table.add_column(column)
        for c in changes:
            table.add_row(c.flag, repr(c.old), repr(c.new), f"[{_STYLE[c.effect]}]{c.effect.value}[/]")
        console.print(table)
        for effect in (Effect.ELASTIC, Effect.TRAJECTORY, Effect.INCOMPATIBLE):
            if any(c.effect is effect for c in changes):
                console.print(f"[{_STYLE[effect]}]{effect.value}[/]: {WHY[effect]}")
        for c in changes:
            if c.option in NOTES:
                console.print(f"{c.flag}: {NOTES[c.option]}")
    if bad := incompatible(changes):
        listed = ", ".join(f"{c.flag} {c.old!r} -> {c.new!r}" for c in bad)
        raise ConfigError(f"incompatible change ({listed}): the checkpoint cannot continue with it; "
                          "start a new run in another --checkpoint-dir instead")
    return changes


def main(checkpoint: str, extra: list[str], *, compare: bool) -> int:
    path = locate(checkpoint)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        footer = verify_file(path)
    except CorruptCheckpointError as e:
        raise CheckpointError(f"{path} is not a usable checkpoint: {e}") from None
    old = footer.get("args")
    if not isinstance(old, dict):
        raise CheckpointError(f"{path} holds no training options (not written by the train command?)")
    old = {**continued_args(old, path), "world_size": int(footer.get("world_size") or 1)}
    proposed = parse_overrides(extra, task=bool(old.get("task")))
    new = {**old, **proposed}
    if "task_options" in proposed:
        new["task_options"] = {**(old.get("task_options") or {}), **proposed["task_options"]}
    if new.get("task"):  # what the task file holds now, against what the checkpoint was trained with
        try:
            new["task_digest"] = source_digest(locate_task(new["task"]))
        except ConfigError:
            pass  # the file is gone: the resume will say so
    
    cfg = TrainConfig(**{k: v for k, v in new.items() if k in config.OPTION_NAMES})
    config.validate(cfg)
    config.batch_split(cfg.batch_size, cfg.mini_batch_size, new["world_size"])  # refused here as in train
    out = Console()
    if compare or extra:
        changes = print_changes(old, new, title=f"{path.name} (step {footer.get('step')}): proposed changes",
                                console=out)
        if not changes:
            out.print("no changes: the command resumes the run exactly as it was")
    print(command_for(path, new))
    return 0
