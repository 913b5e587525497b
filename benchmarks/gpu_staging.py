#!/usr/bin/env python3
"""GPU path of asynchronous saving, checked in one short run (< 5 minutes) when a GPU is lent.

For a state living on CUDA (weights + AdamW moments) it measures, in the same run:
  * plain:   torch.save(state) + fsync straight from the GPU (the usual synchronous save);
  * staging: the loop's stall with async saving, i.e. copies into reused *pinned* host buffers on a
             side stream, synchronized (steady state: the first call allocates the buffers);
  * async:   the store's full async rolling save (stall and background write time), and the
             writer's rate against the disk's ceiling for the same bytes (issue 25: >= 0.6);
  * emergency: one emergency save of the GPU state as `train` makes it on a signal (staged, then
             written and verified), timed until committed (not the retention after it), over the
             ceiling's time for one copy of its bytes (issue 25: <= 1.5); and the same for the
             state's host copy (written in place), what the GPU adds;
and checks that the staged copy, and the checkpoint restored from disk, equal the GPU tensors bit
for bit ("exact"). Prints stall/plain ratios.

    python benchmarks/gpu_staging.py --sizes 500 2000
    python benchmarks/gpu_staging.py --sizes 4 --device cpu   # the same steps on CPU: a smoke run, no figures
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
from checkpoint_io import raw_bandwidth  # the disk's ceiling, measured as benchmarks/checkpoint_io.py does

from train_improved.checkpoint import CheckpointManager, CheckpointOptions, Kind
from train_improved.checkpoint.staging import StagingArea


def device_state(mb: int, device: str) -> dict:
    n = max(3, mb // 4) // 3
    t = lambda i: torch.full((1024, 1024), float(i), device=device)  # noqa: E731 - 4 MiB of float32
    return {"model": {f"w{i}": t(i) for i in range(n)},
            "optimizer": {"state": {i: {"exp_avg": t(-i), "exp_avg_sq": t(i + 0.5)} for i in range(n)}}, "step": 1}


def same_tensors(cpu_copy: dict, state: dict) -> bool:
    """Every tensor of `state` (on the GPU) bitwise equal to its counterpart in `cpu_copy`."""
    def pairs(a, b):
        if isinstance(b, torch.Tensor):
            yield a, b
        elif isinstance(b, dict):
            for k in b:
                yield from pairs(a[k], b[k])
    return all(x.device.type == "cpu" and torch.equal(x, y.cpu()) for x, y in pairs(cpu_copy, state))


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        synchronize()
        t = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(mb: int, base: Path, device: str) -> str:
    state = device_state(mb, device)

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
    staged_exact = same_tensors(area.stage(state), state)
    cpu_copy = area.stage(state)  # the same bytes on the host, for the disk's ceiling
    d = base / "ck"
    with CheckpointManager(d, CheckpointOptions(keep_rolling=1)) as m, \
         CheckpointManager(base / "em", CheckpointOptions(keep_emergency=1)) as em, \
         CheckpointManager(base / "em-host", CheckpointOptions(keep_emergency=1)) as em_host:
        rows = []
        for step in range(1, 4):
            # A rolling save writes the file and its backup, an emergency save one file: each against
            # the ceiling for as many copies, measured just before it.
            ceiling = raw_bandwidth(base, cpu_copy, 2, early_writeback=True)
            m.save(state, step=step, kinds=Kind.ROLLING)
            (rolling,) = m.wait_until_finished()
            ceiling_one_copy = raw_bandwidth(base, cpu_copy, 1, early_writeback=True)
            # The emergency save as `train` makes it on a signal (the default, staged store), timed
            # until it is committed; then the same save of the state's host copy, what the GPU adds.
            emergency = {}  # until committed: staged (if it is), then written and verified
            for name, store, source in (("gpu", em, state), ("host", em_host, cpu_copy)):
                (result,) = store.emergency_save(source, step=step)
                assert result.error is None, result.error
                emergency[name] = (result.stall_s + result.write_s, result.bytes / ceiling_one_copy)
            assert rolling.error is None, rolling.error
            rows.append({"stall": rolling.stall_s, "write": rolling.write_s, "ceiling": ceiling,
                         "writer/ceiling": rolling.bytes / rolling.write_s / ceiling, "emergency": emergency["gpu"][0],
                         "em/ceiling": emergency["gpu"][0] / emergency["gpu"][1],
                         "host em/ceiling": emergency["host"][0] / emergency["host"][1]})
        restored, _ = m.restore("latest")
    exact = staged_exact and same_tensors(restored, state)
    for directory in (d, base / "em", base / "em-host"):
        shutil.rmtree(directory)
    # Medians over the saves after the first, which allocates each store's staging buffers.
    med = {k: statistics.median(row[k] for row in rows[1:]) for k in rows[0]}
    return (f"{mb:>6}Mi {plain_s:>8.2f} {stage_s:>8.3f} {stage_s / plain_s:>11.3f} {med['stall']:>13.3f} "
            f"{med['stall'] / plain_s:>11.3f} {med['write']:>8.2f} {med['ceiling'] / 1e6:>12.0f} "
            f"{med['writer/ceiling']:>14.2f} {med['emergency']:>11.2f} {med['em/ceiling']:>10.2f} "
            f"{med['host em/ceiling']:>15.2f} {str(exact):>6}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[500, 2000], help="state sizes in MiB")
    ap.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a smoke run of the same steps)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: nothing to measure (run this where a GPU is available)")
        return
    print(f"dir {tempfile.gettempdir()}")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (smoke run: these figures mean nothing)"
    print(f"{name}  torch {torch.__version__}")
    print(f"{'state':>8} {'plain s':>8} {'stage s':>8} {'stage/plain':>11} {'async stall s':>13} "
          f"{'stall/plain':>11} {'write s':>8} {'ceiling MB/s':>12} {'writer/ceiling':>14} {'emergency s':>11} "
          f"{'em/ceiling':>10} {'host em/ceiling':>15} {'exact':>6}")
    base = Path(tempfile.mkdtemp(prefix="gpubench-"))
    try:
        for mb in args.sizes:
            print(measure(mb, base, args.device))
            if args.device == "cuda":
                torch.cuda.empty_cache()
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
