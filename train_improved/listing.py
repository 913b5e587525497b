"""`train --list-checkpoints`: the store at a glance, from footers only (no torch, no tensors).

Exit code: 0 when every listed file is readable (and, with --verify, checks out); 1 when the
directory is missing or any checkpoint is damaged, so monitoring scripts can alert on it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .checkpoint import CheckpointError, CheckpointManager, Family, verify_file
from .checkpoint.layout import BACKUP_NAMES, HISTORY
from .checkpoint.records import CheckpointInfo, human_bytes

_TITLES = {Family.LATEST: "Latest", Family.BEST: "Best", Family.ROLLING: "Rolling",
           Family.EMERGENCY: "Emergency", Family.EPOCH: "Epoch"}


def _save_times(directory: Path) -> dict[tuple[str, str], float]:
    """(original name, saved_at) -> write seconds, from the history log."""
    times = {}
    try:
        with open(directory / HISTORY, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash; the rest of the log is still good
                if rec.get("event") == "save":
                    times[(rec.get("name"), rec.get("saved_at"))] = rec.get("write_s")
    except FileNotFoundError:
        pass
    return times


def _row(info: CheckpointInfo, times: dict[tuple[str, str], float], verify: bool) -> dict[str, Any]:
    status = "ok" if info.ok else f"BAD: {info.error}"
    if info.ok and verify:
        try:
            verify_file(info.path)
            status = "verified"
        except CheckpointError as e:
            status = f"BAD: {e}"
    origin = info.meta.get("name")
    return {
        "name": info.name, "family": info.family.value, "kind": info.kind, "step": info.step,
        "epoch": info.epoch, "val_loss": info.metrics.get("val_loss"), "bytes": info.size,
        "saved_at": info.saved_at, "write_s": times.get((origin, info.saved_at)),
        "backup": info.name in BACKUP_NAMES, "same_as": origin if origin and origin != info.name else None,
        "status": status,
    }


def collect(directory: Path, verify: bool = False) -> dict[str, Any]:
    manager = CheckpointManager(directory, read_only=True)
    times = _save_times(directory)
    rows = [_row(i, times, verify) for i in manager.all()]
    usage = manager.usage_by_family()
    return {
        "directory": str(directory.resolve()),
        "checkpoints": rows,
        "storage_bytes": {fam.value: b for fam, b in usage.items()},
        "total_bytes": sum(usage.values()),
        "free_bytes": shutil.disk_usage(directory).free,
    }


def list_checkpoints(directory: Path, *, as_json: bool = False, verify: bool = False,
                     console: Console | None = None) -> int:
    if console is None:
        # Piped to a file or a pager, rich would cut the table to 80 columns and truncate file names,
        # the one thing a reader needs whole. A terminal keeps its own width (names never wrap there).
        console = Console() if sys.stdout.isatty() or "COLUMNS" in os.environ else Console(width=200)
    if not directory.exists():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory")
    data = collect(directory, verify)
    bad = sum(r["status"].startswith("BAD") for r in data["checkpoints"])
    if as_json:
        print(json.dumps(data, indent=2))
        return 1 if bad else 0
    if not data["checkpoints"]:
        console.print(f"no checkpoints in {data['directory']}")
        return 0
    for family, title in _TITLES.items():
        rows = [r for r in data["checkpoints"] if r["family"] == family.value]
        if not rows:
            continue
        table = Table(title=f"{title} ({human_bytes(data['storage_bytes'][family.value])})", title_justify="left")
        names = [r["name"] + _note(r) for r in rows]
        table.add_column("file", no_wrap=True, min_width=max(len(n) for n in names))
        for col, justify in (("step", "right"), ("epoch", "right"), ("val_loss", "right"),
                             ("size", "right"), ("saved", "left"), ("write", "right"), ("status", "left")):
            table.add_column(col, justify=justify)  # type: ignore[arg-type]
        for r, name in zip(rows, names, strict=True):
            status = f"[red]{r['status']}[/]" if r["status"].startswith("BAD") else f"[green]{r['status']}[/]"
            table.add_row(
                name, _fmt(r["step"]), _fmt(r["epoch"]),
                f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-", human_bytes(r["bytes"]),
                _when(r["saved_at"]), f"{r['write_s']:.2f}s" if r["write_s"] is not None else "-", status,
            )
        console.print(table)
    parts = ", ".join(f"{k} {human_bytes(v)}" for k, v in data["storage_bytes"].items() if v)
    console.print(f"storage: {parts}; total {human_bytes(data['total_bytes'])} "
                  f"(hard links counted once); free {human_bytes(data['free_bytes'])}", highlight=False)
    if bad:
        console.print(f"[red]{bad} damaged checkpoint(s)[/]: `train --resume latest` skips them and says so")
    return 1 if bad else 0


def _note(row: dict[str, Any]) -> str:
    return " (backup)" if row["backup"] else (f" = {row['same_as']}" if row["same_as"] else "")


def _fmt(v: Any) -> str:
    return "-" if v is None else str(v)


def _when(iso: str | None) -> str:
    if not iso:
        return "-"
    try:
        return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return iso
