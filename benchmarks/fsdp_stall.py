#!/usr/bin/env python3
"""The loop's stall per sharded save under `torchrun --fsdp`: async (the default) vs --no-async-save.

Runs the same 2-rank FSDP2 job twice (gloo on CPU, or nccl where there are 2 GPUs) and reads each
save's `stall_s` and `write_s` from the metrics file. With async saving each rank only copies its
shards to host memory and the loop goes on; with --no-async-save it waits for the whole commit
(every rank's DCP write, the digests, state.pt, the backup copy, latest).

    python benchmarks/fsdp_stall.py --n-layer 6 --n-embd 512 --steps 12 --every 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from conftest_free_corpus import write_corpus


def run(workdir: Path, args: argparse.Namespace, async_save: bool) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "train_improved", "--fsdp", "--data", "corpus.txt", "--n-layer", str(args.n_layer),
           "--n-embd", str(args.n_embd), "--n-head", "8", "--block-size", "64", "--batch-size", "4",
           "--mini-batch-size", "2", "--max-steps", str(args.steps), "--checkpoint-freq", str(args.every),
           "--eval-interval", str(10**6), "--eval-steps", "1", "--sample-length", "0", "--keep-checkpoints", "2",
           "--async-save" if async_save else "--no-async-save"]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"torchrun failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (workdir / "runs" / "metrics.jsonl").read_text().splitlines()]
    # The final save at the last step is waited for either way: only the saves the loop ran past count.
    return [r for r in records if r["event"] == "checkpoint" and r["kind"] == "rolling" and r["step"] < args.steps]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=512)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--every", type=int, default=3)
    args = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, async_save in (("async", True), ("sync", False)):
            d = Path(tmp) / name
            d.mkdir()
            write_corpus(d / "corpus.txt")
            rows[name] = run(d, args, async_save)
    med = statistics.median
    size = rows["async"][0]["bytes"] / 1e6
    print(f"2 ranks, --fsdp, {args.n_layer} layers x {args.n_embd}: {len(rows['async'])} rolling saves of {size:.0f} MB "
          "(checkpoint and its backup); medians")
    for name, saves in rows.items():
        print(f"{name:>6}: stall {med(r['stall_s'] for r in saves):.3f} s   write {med(r['write_s'] for r in saves):.3f} s")
    print(f"stall async / sync: {med(r['stall_s'] for r in rows['async']) / med(r['stall_s'] for r in rows['sync']):.3f}")


if __name__ == "__main__":
    main()
