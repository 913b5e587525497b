"""`train --list-checkpoints`: the store at a glance, from footers only (no torch, no tensors).

Exit code: 0 when every listed file is readable (and, with --verify, checks out and loads); 1 when
the directory is missing or any checkpoint is damaged, so monitoring scripts can alert on it. A file
that failed verification when a run tried to resume from it (recorded in history.jsonl) shows as
damaged without --verify too.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .checkpoint import CheckpointError, CheckpointManager, Family, load_checkpoint, verify_file
from .checkpoint.fallback import current_line
from .checkpoint.fileformat import ShardsOnMirrorError
from .checkpoint.inventory import Entry
from .checkpoint.layout import BACKUP_NAMES, HISTORY, LATEST, parse_name
from .checkpoint.lineage import Line
from .checkpoint.records import CheckpointInfo, human_bytes
from .checkpoint.remote import RemoteStore, mask, one_line

_TITLES = {Family.LATEST: "Latest", Family.BEST: "Best", Family.ROLLING: "Rolling",
           Family.EMERGENCY: "Emergency", Family.EPOCH: "Epoch", Family.TOP: "Top K by the metric"}


def _history(directory: Path) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str | None], dict[str, Any]]]:
    """From the history log: (original name, saved_at) -> write seconds, and (name, digest) -> failed verification."""
    times, failures = {}, {}
    try:
        with open(directory / HISTORY, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash; the rest of the log is still good
                if rec.get("event") == "save":
                    times[(rec.get("name"), rec.get("saved_at"))] = rec.get("write_s")
                elif rec.get("event") == "verify_failed":
                    failures[(rec.get("name"), rec.get("digest"))] = rec
    except FileNotFoundError:
        pass
    return times, failures


def _row(info: CheckpointInfo, times: dict[tuple[str, str], float],
         failures: dict[tuple[str, str | None], dict[str, Any]], verify: bool, line: Line | None,
         latest: CheckpointInfo | None, metric: str) -> dict[str, Any]:
    status = "ok" if info.ok else f"BAD: {info.error}"
    failed = failures.get((info.name, info.meta.get("digest")))
    if info.ok and failed is not None:  # the same file failed a verification (a resume fell back from it)
        when = datetime.fromtimestamp(failed.get("time", 0)).strftime("%Y-%m-%d %H:%M")
        status = f"BAD: failed verification at {when}: {failed.get('error')}"
    if info.ok and verify:
        try:
            verify_file(info.path)
            load_checkpoint(info.path, map_location="meta", shards=False, verify=False)  # loadable, not just intact
            status = "verified"
        except ShardsOnMirrorError as e:  # nodes with disks of their own: whole only on the mirror
            status = f"verified here; {e}"
        except CheckpointError as e:
            status = f"BAD: {e}"
    origin = info.meta.get("name")
    notes = []
    if info.family is Family.LATEST and origin and origin != info.name:
        notes.append(f"= {origin}")
    if info.ok and line is not None and not line.holds(info.meta):
        notes.append("other line")  # left behind when a run resumed from an earlier step
    if (info.ok and latest is not None and latest.ok and info.family is not Family.LATEST
            and (info.step or -1) > (latest.step or -1) and (line is None or line.holds(info.meta))):
        notes.append(f"newer than {LATEST}")  # a kill between its commit and latest's move: resume takes it
    eval_step = info.meta.get("eval_step")
    return {
        "name": info.name, "family": info.family.value, "kind": info.kind, "step": info.step,
        "epoch": info.epoch, "val_loss": info.metrics.get("val_loss"),
        "val_loss_step": eval_step if isinstance(eval_step, int) else info.step, "bytes": info.size,
        # The run's --metric (what decides best_model.pt): val_loss carries the step it was measured at.
        "metric": metric, "metric_value": info.metrics.get(metric),
        "metric_step": eval_step if metric == "val_loss" and isinstance(eval_step, int) else info.step,
        "saved_at": info.saved_at, "write_s": times.get((origin, info.saved_at)),
        "backup": info.name in BACKUP_NAMES, "notes": notes, "status": status,
    }


def collect(directory: Path, verify: bool = False, mirror_options: dict[str, Any] | None = None) -> dict[str, Any]:
    manager = CheckpointManager(directory, read_only=True)
    times, failures = _history(directory)
    infos = manager.all()
    line = current_line(infos)
    latest = next((i for i in infos if i.name == LATEST), None)
    args = latest.meta.get("args") if latest is not None and latest.ok else None
    metric = args.get("metric") if isinstance(args, dict) and isinstance(args.get("metric"), str) else "val_loss"
    rows = [_row(i, times, failures, verify, line, latest, metric) for i in infos]
    mirror = _run_mirror(latest, mirror_options)
    if mirror is not None:
        listed = {e.digest for e in mirror.manifest.values()}
        for row, info in zip(rows, infos, strict=True):
            row["mirror"] = "unreachable" if mirror.problem else \
                "mirrored" if info.meta.get("digest") in listed else "pending"
        local = {i.name for i in infos}
        rows += [dict(_remote_row(e, "ok"), mirror="remote only") for e in mirror.manifest.values() if e.name not in local]
    usage = manager.usage_by_family()
    return {
        "directory": str(directory.resolve()),
        "checkpoints": rows,
        "storage_bytes": {fam.value: b for fam, b in usage.items()},
        "total_bytes": sum(usage.values()),
        "free_bytes": shutil.disk_usage(directory).free,
        **({"mirror": mask(mirror.url), "mirror_problem": mirror.problem} if mirror is not None else {}),
    }


@dataclass(frozen=True)
class _RunMirror:
    url: str
    manifest: dict[str, Entry]
    problem: str | None = None  # why it could not be read now: no row can say mirrored or pending


def _run_mirror(latest: CheckpointInfo | None, options: dict[str, Any] | None) -> _RunMirror | None:
    """The run's mirror (from latest.pt's options, or CHECKPOINT_MIRROR) and its manifest; None without one."""
    url = ((latest.meta.get("args") or {}).get("mirror") if latest is not None and latest.ok else None) or \
        os.environ.get("CHECKPOINT_MIRROR")
    if not url:
        return None
    try:
        return _RunMirror(url, RemoteStore.open(url, options or {}, check_writable=False).manifest())
    except (CheckpointError, ValueError, OSError) as e:
        problem = one_line(e)
        if not options:  # the usual cause: the options are never stored with the run, so they are not known here
            problem += ("; a mirror's options (endpoint, credentials profile) are never stored: give them again "
                        "with --mirror-options '{...}' or CHECKPOINT_MIRROR_OPTIONS")
        return _RunMirror(url, {}, problem)


def _remote_row(entry: Entry, status: str) -> dict[str, Any]:
    """A row for one manifest entry: what the manifest knows (no metrics: they live in the footer)."""
    parsed = parse_name(entry.name)
    return {"name": entry.name, "family": parsed.family.value if parsed else "latest", "kind": entry.kind,
            "step": entry.step, "epoch": None, "val_loss": None, "val_loss_step": None, "metric": None,
            "metric_value": None, "metric_step": None, "bytes": entry.total_bytes,
            "saved_at": entry.saved_at, "write_s": None, "backup": entry.name in BACKUP_NAMES,
            "notes": [], "status": status, "object": entry.key}


def list_mirror(url: str | None, options: dict[str, Any], *, as_json: bool = False, verify: bool = False) -> int:
    """`train --list-checkpoints --mirror URL`: the remote side alone, from its manifest (no tensor downloaded)."""
    assert url is not None
    remote = RemoteStore.open(url, options, check_writable=False)
    rows = []
    for entry in sorted(remote.manifest().values(), key=lambda e: (e.step or -1, e.name)):
        status = "ok"
        if verify:
            try:
                remote.verify_entry(entry)
                status = "verified"
            except (CheckpointError, OSError) as e:
                status = f"BAD: {e}"
        rows.append(_remote_row(entry, status))
    bad = sum(r["status"].startswith("BAD") for r in rows)
    if as_json:
        print(json.dumps({"mirror": mask(url), "checkpoints": rows}, indent=2))
        return 1 if bad else 0
    console = Console() if sys.stdout.isatty() or "COLUMNS" in os.environ else Console(width=200)
    if not rows:
        console.print(f"no checkpoints on the mirror {mask(url)}")
    for family, title in _TITLES.items():
        if group := [r for r in rows if r["family"] == family.value]:
            _print_table(console, f"{title} on {mask(url)}", group)
    if bad:
        console.print(f"[red]{bad} damaged object(s)[/] on the mirror: a resume from it skips them and says so")
    return 1 if bad else 0


def list_checkpoints(directory: Path, *, as_json: bool = False, verify: bool = False,
                     console: Console | None = None, mirror_options: dict[str, Any] | None = None) -> int:
    if console is None:
        # Piped to a file or a pager, rich would cut the table to 80 columns and truncate file names,
        # the one thing a reader needs whole. A terminal keeps its own width (names never wrap there).
        console = Console() if sys.stdout.isatty() or "COLUMNS" in os.environ else Console(width=200)
    if not directory.exists():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory")
    data = collect(directory, verify, mirror_options)
    bad = sum(r["status"].startswith("BAD") for r in data["checkpoints"])
    if as_json:
        print(json.dumps(data, indent=2))
        return 1 if bad else 0
    if not data["checkpoints"]:
        console.print(f"no checkpoints in {data['directory']}")
        return 0
    for family, title in _TITLES.items():
        if rows := [r for r in data["checkpoints"] if r["family"] == family.value]:
            _print_table(console, f"{title} ({human_bytes(data['storage_bytes'][family.value])})", rows)
    parts = ", ".join(f"{k} {human_bytes(v)}" for k, v in data["storage_bytes"].items() if v)
    console.print(f"storage: {parts}; total {human_bytes(data['total_bytes'])} "
                  f"(hard links counted once); free {human_bytes(data['free_bytes'])}", highlight=False)
    if data.get("mirror_problem"):
        console.print(f"[yellow]mirror {data['mirror']} unreachable:[/] {escape(data['mirror_problem'])}",
                      highlight=False)
    if bad:
        console.print(f"[red]{bad} damaged checkpoint(s)[/]: `train --resume latest` skips them and says so")
    return 1 if bad else 0


_COLUMNS = (("file", "left"), ("step", "right"), ("epoch", "right"), ("metric", "right"), ("size", "right"),
            ("saved", "left"), ("write", "right"))
_DROPPABLE = ("write", "saved", "epoch", "size")  # left out, in this order, where the terminal is too narrow


def _table(title: str, rows: list[dict[str, Any]], width: int) -> tuple[Table, int]:
    """Names and numbers are never cut: a narrow terminal loses whole columns first, then the status folds.

    Returns the table and the width to print it at (wider than the terminal only if even the
    narrowest table does not fit: the terminal then wraps lines, which cuts nothing).
    """
    cells = [{"file": r["name"] + _note(r), "step": _fmt(r["step"]), "epoch": _fmt(r["epoch"]),
              "metric": _metric(r), "size": human_bytes(r["bytes"]), "saved": _when(r["saved_at"]),
              "write": f"{r['write_s']:.2f}s" if r["write_s"] is not None else "-",
              "mirror": r.get("mirror", "")} for r in rows]
    columns = list(_COLUMNS) + ([("mirror", "left")] if any(c["mirror"] for c in cells) else [])
    headers = {"metric": next((r["metric"] for r in rows if r.get("metric")), "val_loss")}  # the run's --metric
    widths = {col: max(len(headers.get(col, col)), *(len(c[col]) for c in cells)) for col, _ in columns}

    def needed() -> int:
        return sum(widths[c] + 3 for c, _ in columns) + 14  # borders, padding, and a status of ten

    for drop in _DROPPABLE:
        if needed() <= width:
            break
        columns = [c for c in columns if c[0] != drop]
    table = Table(title=title, title_justify="left")
    for col, justify in columns:
        table.add_column(headers.get(col, col), justify=justify, no_wrap=True,  # type: ignore[arg-type]
                         min_width=widths[col])
    # The status gets what is left (at least ten columns), so rich never has to squeeze the others.
    statuses = [len(r["status"]) + 30 for r in rows]
    table.add_column("status", overflow="fold", width=max(10, min(max(statuses), width - needed() + 10)))
    for r, c in zip(rows, cells, strict=True):
        same = next((n for n in r["notes"] if n.startswith("=")), "")
        status = f"[red]{r['status']}[/]" if r["status"].startswith("BAD") else f"[green]{r['status']}[/]"
        table.add_row(*(c[col] for col, _ in columns), status + (f" ({same})" if same else ""))
    return table, max(width, needed())


def _print_table(console: Console, title: str, rows: list[dict[str, Any]]) -> None:
    terminal = console.width
    table, console.width = _table(title, rows, terminal)  # wider only if even the narrowest table needs it
    console.print(table)
    console.width = terminal


def _note(row: dict[str, Any]) -> str:
    notes = (["backup"] if row["backup"] else []) + [n for n in row["notes"] if not n.startswith("=")]
    return f" ({', '.join(notes)})" if notes else ""


def _metric(row: dict[str, Any]) -> str:
    if row.get("metric_value") is None:
        return "-"
    at = row["metric_step"]
    return f"{row['metric_value']:.4f}" + (f" @{at}" if at is not None and at != row["step"] else "")


def _fmt(v: Any) -> str:
    return "-" if v is None else str(v)


def _when(iso: str | None) -> str:
    if not iso:
        return "-"
    try:
        return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return iso
