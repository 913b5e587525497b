#!/usr/bin/env python3
"""`train --list-checkpoints` speed: 2 vs 200 checkpoints, and small vs large files.

Times the real command (a subprocess, as a user runs it) and the in-process collection alone.

    python benchmarks/listing.py                      # the recorded cases: 2 and 200 small files, 2 large
    python benchmarks/listing.py --count 200 --large-mb 200
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from train_improved.checkpoint import CheckpointManager, CheckpointOptions, Kind
from train_improved.listing import collect


def fill(directory: Path, count: int, mb: float) -> None:
    state = {"w": torch.zeros(int(mb * 2**20 / 4))}
    with CheckpointManager(directory, CheckpointOptions(keep_rolling=count, async_save=False)) as m:
        for step in range(1, count + 1):
            m.save(state, step=step, kinds=Kind.ROLLING, args={"lr": 0.001})


def timed(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=200, help="checkpoints in the many-files case")
    ap.add_argument("--large-mb", type=float, default=200, help="size of each file in the large-files case, MiB")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cases = {"2 x 10 KiB": (2, 0.01), f"{args.count} x 10 KiB": (args.count, 0.01),
                 f"2 x {args.large_mb:g} MiB": (2, args.large_mb)}
        print(f"{'case':>14} {'files':>6} {'collect s':>10} {'command s':>10}")
        for name, (count, mb) in cases.items():
            d = Path(tmp) / name.replace(" ", "")
            fill(d, count, mb)
            files = len(list(d.glob("*.pt")))
            inproc = timed(lambda d=d: collect(d))
            cmd = timed(lambda d=d: subprocess.run([sys.executable, "-m", "train_improved", "--list-checkpoints",
                                                "--json", "--checkpoint-dir", str(d)], check=True,
                                               capture_output=True), repeats=3)
            print(f"{name:>14} {files:>6} {inproc:>10.4f} {cmd:>10.3f}")


if __name__ == "__main__":
    main()
