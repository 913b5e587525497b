#!/usr/bin/env python3
"""GPU path of asynchronous saving, checked in one short run (< 5 minutes) when a GPU is lent.

For a state living on CUDA (weights + AdamW moments) it measures, in the same run:
  * plain:   torch.save(state) + fsync straight from the GPU (the usual synchronous save);
  * staging: the loop's stall with async saving, i.e. copies into reused *pinned* host buffers on a
             side stream, synchronized (steady state: the first call allocates the buffers);
  * async:   the store's full async rolling save (stall and background write time);
and checks that the staged bytes equal the GPU tensors. Prints stall/plain ratios.

    python benchmarks/gpu_staging.py --sizes 500 2000
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from train_improved.checkpoint import CheckpointManager, CheckpointOptions, Kind
from train_improved.checkpoint.staging import StagingArea


def cuda_state(mb: int) -> dict:
    n = max(3, mb // 4) // 3
    t = lambda i: torch.full((1024, 1024), float(i), device="cuda")  # noqa: E731 - 4 MiB of float32
    return {"model": {f"w{i}": t(i) for i in range(n)},
            "optimizer": {"state": {i: {"exp_avg": t(-i), "exp_avg_sq": t(i + 0.5)} for i in range(n)}}, "step": 1}


def timed(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(mb: int, base: Path) -> str:
    state = cuda_state(mb)

    def plain() -> None:
        path = base / "plain.pt"
        torch.save(state, path)
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        path.unlink()

    plain_s = timed(plain)
    area = StagingArea()
    area.stage(state)  # allocate the pinned buffers once, as the first save of a run does
    stage_s = timed(lambda: area.stage(state))
    snap = area.stage(state)
    exact = all(torch.equal(snap["model"][k], v.cpu()) for k, v in state["model"].items())
    d = base / "ck"
    with CheckpointManager(d, CheckpointOptions(keep_rolling=1)) as m:
        results = []
        for step in range(1, 4):
            m.save(state, step=step, kinds=Kind.ROLLING)
            results += m.wait_until_finished()
    shutil.rmtree(d)
    stall = statistics.median(r.stall_s for r in results[1:])
    write = statistics.median(r.write_s for r in results[1:])
    return (f"{mb:>6}Mi {plain_s:>8.2f} {stage_s:>8.3f} {stage_s / plain_s:>11.3f} {stall:>13.3f} "
            f"{stall / plain_s:>11.3f} {write:>8.2f} {str(exact):>6}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[500, 2000], help="state sizes in MiB")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device here: nothing to measure (run this where a GPU is available)")
        return
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"{'state':>8} {'plain s':>8} {'stage s':>8} {'stage/plain':>11} {'async stall s':>13} "
          f"{'stall/plain':>11} {'write s':>8} {'exact':>6}")
    base = Path(tempfile.mkdtemp(prefix="gpubench-"))
    try:
        for mb in args.sizes:
            print(measure(mb, base))
            torch.cuda.empty_cache()
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
