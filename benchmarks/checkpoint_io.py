#!/usr/bin/env python3
"""Checkpoint cost against baselines measured in the same run (SPEC §7, issue 6).

For each state size it measures
  * plain:  torch.save(state, path) + fsync, the usual synchronous save (the baseline);
  * raw:    write+fsync bandwidth of the same directory for non-zero data (and dd from /dev/zero);
  * sync:   the store with --no-async-save (the loop waits for everything);
  * async:  the store's default: the loop waits only for the copy into reused staging buffers;
  * emergency: one synchronous emergency save (a single verified file), what a SIGTERM costs;
and prints stall ratio (async stall / plain), background throughput / raw disk bandwidth, and
bytes written per rolling save / state size.

    python benchmarks/checkpoint_io.py --sizes 100 500 1000 --dir /tmp/ckbench
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from train_improved.checkpoint import CheckpointManager, CheckpointOptions, Kind


def make_state(mb: int) -> dict:
    """A model-plus-AdamW-shaped state: 1/3 weights, 2/3 optimizer moments, 4 MiB tensors."""
    n = max(3, mb // 4)
    t = lambda i: torch.full((1024, 1024), float(i))  # noqa: E731 - 4 MiB of float32
    params = {f"layer{i}.weight": t(i) for i in range(n // 3)}
    state = {i: {"exp_avg": t(i), "exp_avg_sq": t(-i), "step": torch.tensor(10.0)} for i in range(n // 3)}
    return {"model": params, "optimizer": {"state": state, "param_groups": [{"lr": 1e-3, "params": list(range(n // 3))}]},
            "step": 10}


def state_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


def drop_file(path: Path) -> None:
    path.unlink(missing_ok=True)


def plain_save(state: dict, path: Path) -> float:
    t = time.perf_counter()
    torch.save(state, path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - t
    drop_file(path)
    return elapsed


def raw_bandwidth(directory: Path, nbytes: int) -> float:
    """Write+fsync bandwidth for non-zero data: a 16 MiB random buffer written repeatedly.

    `dd if=/dev/zero` is kept as a second reference, but zero pages can be cheaper than real data on
    virtual or compressing storage, which would flatter the baseline.
    """
    buf = os.urandom(16 << 20)
    count = max(1, nbytes // len(buf))
    path = directory / "raw.bin"
    t = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(count):
            f.write(buf)
        f.flush()
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - t
    drop_file(path)
    return count * len(buf) / elapsed


def dd_bandwidth(directory: Path, nbytes: int) -> float:
    path = directory / "dd.bin"
    count = max(1, nbytes // (16 << 20))
    t = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=16M", f"count={count}", "conv=fsync"],
                   check=True, capture_output=True)
    elapsed = time.perf_counter() - t
    drop_file(path)
    return count * (16 << 20) / elapsed


def store_saves(state: dict, directory: Path, async_save: bool, repeats: int, kind: Kind = Kind.ROLLING) -> list:
    shutil.rmtree(directory, ignore_errors=True)
    results = []
    with CheckpointManager(directory, CheckpointOptions(async_save=async_save, keep_rolling=1)) as m:
        for step in range(1, repeats + 2):
            m.save(state, step=step, kinds=kind)
            results += m.wait_until_finished()
    shutil.rmtree(directory, ignore_errors=True)
    return results[1:]  # the first save allocates the staging buffers: steady state is what training sees


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 500], help="state sizes in MiB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args()
    base = args.dir or Path(tempfile.mkdtemp(prefix="ckbench-"))
    base.mkdir(parents=True, exist_ok=True)
    print(f"dir {base}  torch {torch.__version__}  threads {torch.get_num_threads()}")
    header = (f"{'state':>8} {'plain s':>8} {'sync s':>8} {'async stall s':>13} {'stall/plain':>11} "
              f"{'write s':>8} {'MB/s':>7} {'raw MB/s':>8} {'dd MB/s':>8} {'thru/raw':>8} {'bytes/state':>11} "
              f"{'emergency s':>11}")
    print(header)
    for mb in args.sizes:
        state = make_state(mb)
        size = state_bytes(state)
        plain = statistics.median(plain_save(state, base / "plain.pt") for _ in range(args.repeats))
        raw = statistics.median(raw_bandwidth(base, 2 * size) for _ in range(args.repeats))
        dd = statistics.median(dd_bandwidth(base, 2 * size) for _ in range(args.repeats))
        sync = store_saves(state, base / "sync", False, args.repeats)
        asyn = store_saves(state, base / "async", True, args.repeats)
        emergency = statistics.median(r.stall_s for r in store_saves(state, base / "em", False, args.repeats,
                                                                      Kind.EMERGENCY))
        stall = statistics.median(r.stall_s for r in asyn)
        write = statistics.median(r.write_s for r in asyn)
        written = statistics.median(r.bytes for r in asyn)
        print(f"{size / 2**20:>6.0f}Mi {plain:>8.2f} {statistics.median(r.stall_s for r in sync):>8.2f} "
              f"{stall:>13.3f} {stall / plain:>11.3f} {write:>8.2f} {written / write / 1e6:>7.0f} "
              f"{raw / 1e6:>8.0f} {dd / 1e6:>8.0f} {written / write / raw:>8.2f} {written / size:>11.4f} "
              f"{emergency:>11.2f}")
    shutil.rmtree(base, ignore_errors=True) if args.dir is None else None


if __name__ == "__main__":
    main()
