#!/usr/bin/env python3
"""Steps/s of a real training run checkpointing every N steps vs the same run without checkpoints.

The model is sized so the training state is ~85 MB (7 M parameters + AdamW moments): big enough for
a save to matter, small enough for 2 CPU cores. On this machine the background writer competes with
training for the same two cores, so this is the honest end-to-end cost, not just the stall.

    python benchmarks/end_to_end.py --steps 60 --every 10
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from conftest_free_corpus import write_corpus

from train_improved.checkpoint import CheckpointManager
from train_improved.config import resolve
from train_improved.metrics import MetricsLogger
from train_improved.session import checkpoint_options
from train_improved.signals import GracefulStop
from train_improved.trainer import Trainer

MODEL = {"n_layer": 4, "n_head": 6, "n_embd": 384, "block_size": 64, "batch_size": 8, "mini_batch_size": 8,
         "eval_interval": 10**6, "sample_length": 0}


def timed_run(workdir: Path, steps: int, every: int | None, async_save: bool) -> tuple[float, list[dict]]:
    cfg = resolve(cli={**MODEL, "data": str(workdir / "corpus.txt"), "max_steps": steps,
                       "checkpoint_freq": every or 10**6, "async_save": async_save,
                       "checkpoint_dir": str(workdir / "ck"), "metrics_file": str(workdir / "m.jsonl")},
                  environ={}, config_file=None)
    trainer = Trainer(cfg)
    with CheckpointManager(cfg.checkpoint_dir, checkpoint_options(cfg)) as m, GracefulStop() as stop:
        t = time.perf_counter()
        trainer.run(stop, m, MetricsLogger(cfg.metrics_path))
        elapsed = time.perf_counter() - t
    records = [json.loads(line) for line in cfg.metrics_path.read_text().splitlines()]
    return elapsed, [r for r in records if r["event"] == "checkpoint" and r["step"] < steps]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = {}
        for name, every, async_save in (("no checkpoints", None, True), ("async", args.every, True),
                                        ("sync", args.every, False)):
            d = Path(tmp) / name.replace(" ", "_")
            d.mkdir()
            write_corpus(d / "corpus.txt")
            rows[name] = timed_run(d, args.steps, every, async_save)
        base = rows["no checkpoints"][0]
        print(f"{args.steps} steps, rolling checkpoint every {args.every} steps (the final save excluded from "
              f"the stall column; wall time includes it)")
        for name, (elapsed, ckpts) in rows.items():
            stall = sum(r["stall_s"] for r in ckpts)
            size = ckpts[0]["bytes"] / 2 / 1e6 if ckpts else 0
            print(f"{name:>15}: {args.steps / elapsed:6.2f} steps/s  ({elapsed / base:.3f}x wall)  "
                  f"{len(ckpts)} saves of {size:.0f} MB, loop stalled {stall:.2f}s in total")


if __name__ == "__main__":
    main()
