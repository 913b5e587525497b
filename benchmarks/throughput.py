#!/usr/bin/env python3
"""Tokens/s of the runner vs a bare PyTorch loop of the same model, batch, data and device.

The bare loop below is what nanoGPT's train.py does per step (forward, backward, clip, AdamW step,
zero_grad, scheduler), without logging or checkpoints. The runner is `Trainer.run` with its
metrics file and progress, evaluation and checkpoints pushed out of the measured window. Both run
in this process, alternating, and the median per-step time of each is compared.

    python benchmarks/throughput.py --steps 60 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from train_improved.checkpoint import CheckpointManager, CheckpointOptions
from train_improved.config import resolve
from train_improved.metrics import MetricsLogger
from train_improved.signals import GracefulStop
from train_improved.trainer import Trainer


def runner_step_times(cfg_overrides: dict, steps: int, workdir: Path) -> list[float]:
    cfg = resolve(cli={**cfg_overrides, "max_steps": steps, "eval_interval": 10**6, "checkpoint_freq": 10**6,
                       "checkpoint_dir": str(workdir / "ck"), "metrics_file": str(workdir / "m.jsonl"),
                       "sample_length": 0}, environ={}, config_file=None)
    trainer = Trainer(cfg)
    with CheckpointManager(cfg.checkpoint_dir, CheckpointOptions(save_every=None)) as m, GracefulStop() as stop:
        trainer.run(stop, m, MetricsLogger(cfg.metrics_path))
    times = [json.loads(line)["time"] for line in cfg.metrics_path.read_text().splitlines()
             if json.loads(line)["event"] == "step"]
    # Wall time between consecutive step records: everything the runner does per step is inside.
    return [b - a for a, b in zip(times[5:], times[6:], strict=False)]


def bare_step_times(cfg_overrides: dict, steps: int) -> list[float]:
    cfg = resolve(cli=cfg_overrides, environ={}, config_file=None)
    trainer = Trainer(cfg)  # only to get the identical model, optimizer, schedule and data
    model, opt, sched, loader = trainer.raw_model, trainer.optimizer, trainer.scheduler, trainer.train_loader
    accum = trainer.grad_accum
    out, last = [], None
    for _ in range(steps):
        for _ in range(accum):
            x, y = loader.next_batch()
            _, loss = model(x, y)
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        loss.item()  # nanoGPT reads the loss back too (for logging)
        now = time.perf_counter()
        if last is not None:
            out.append(now - last)
        last = now
    return out[5:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cfg = {}  # the demo's defaults: the size people run first
    tokens = resolve(cli=cfg, environ={}, config_file=None)
    tokens_per_step = tokens.batch_size * tokens.block_size
    runner, bare = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            bare += bare_step_times(cfg, args.steps)
            runner += runner_step_times(cfg, args.steps, Path(tmp) / str(r))
    b, rn = statistics.median(bare), statistics.median(runner)
    print(f"model: demo defaults ({tokens.n_layer}x{tokens.n_embd}, batch {tokens.batch_size}x{tokens.block_size}), "
          f"device cpu, threads {torch.get_num_threads()}")
    print(f"bare loop: {tokens_per_step / b:,.0f} tok/s   runner: {tokens_per_step / rn:,.0f} tok/s   "
          f"runner/bare: {b / rn:.3f}  (overhead {100 * (rn / b - 1):+.1f}%)")


if __name__ == "__main__":
    main()
