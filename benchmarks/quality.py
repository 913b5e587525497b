#!/usr/bin/env python3
"""Validation loss of `train` vs a nanoGPT-style reference loop: same model, optimizer, schedule, steps.

The reference samples every row of every batch as an independent random window of the training
split (nanoGPT's get_batch); `train` reads each epoch's windows in a shuffled order. Everything else
is shared: the initial weights (same seed), AdamW and its groups, clipping, the warmup + cosine
schedule, and the evaluation (the same fixed held-out windows, `Trainer.evaluate`). Both run on CPU
in this process, one after the other. Prints the validation loss at each evaluation.

    python benchmarks/quality.py                         # the demo's model and schedule (~10 min on 2 cores)
    python benchmarks/quality.py --steps 20 --eval-interval 10 --tiny     # a smoke run
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from train_improved.checkpoint import CheckpointManager, CheckpointOptions
from train_improved.config import resolve
from train_improved.metrics import MetricsLogger
from train_improved.signals import GracefulStop
from train_improved.trainer import Trainer, learning_rate

TINY = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32, "batch_size": 8, "mini_batch_size": 8,
        "eval_steps": 2}


def runner(options: dict, workdir: Path) -> dict[int, float]:
    cfg = resolve(cli={**options, "checkpoint_dir": str(workdir / "ck"), "metrics_file": str(workdir / "m.jsonl"),
                       "sample_length": 0, "checkpoint_freq": 10**6}, environ={}, config_file=None)
    trainer = Trainer(cfg)
    with CheckpointManager(cfg.checkpoint_dir, CheckpointOptions(save_every=None)) as m, GracefulStop() as stop:
        trainer.run(stop, m, MetricsLogger(cfg.metrics_path))
    records = [json.loads(line) for line in cfg.metrics_path.read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in records if r["event"] == "eval"}


def reference(options: dict) -> dict[int, float]:
    cfg = resolve(cli=options, environ={}, config_file=None)
    trainer = Trainer(cfg)  # the same initial weights, optimizer, evaluation windows
    model, opt = trainer.model, trainer.optimizer
    data = torch.from_numpy(np.concatenate([np.asarray(s, dtype=np.int64) for s in trainer.workload.train_set.shards]))
    B, T, accum = cfg.mini_batch_size, cfg.block_size, trainer.grad_accum
    gen = torch.Generator().manual_seed(cfg.seed)
    out = {}
    with GracefulStop() as stop:
        for step in range(1, trainer.total_steps + 1):
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, step, trainer.total_steps)
            for _ in range(accum):
                ix = torch.randint(len(data) - T - 1, (B,), generator=gen)
                x = torch.stack([data[i:i + T] for i in ix])
                y = torch.stack([data[i + 1:i + 1 + T] for i in ix])
                _, loss = model(x, y)
                (loss / accum).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step % cfg.eval_interval == 0 or step == trainer.total_steps:
                out[step] = trainer.evaluate(stop)["val_loss"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, help="optimizer steps (default: the demo's)")
    ap.add_argument("--eval-interval", type=int)
    ap.add_argument("--tiny", action="store_true", help="a 1-layer model, for a smoke run")
    args = ap.parse_args()
    options = {**(TINY if args.tiny else {}), "device": "cpu"}
    if args.steps:
        options["max_steps"] = args.steps
    if args.eval_interval:
        options["eval_interval"] = args.eval_interval
    cfg = resolve(cli=options, environ={}, config_file=None)
    print(f"model {cfg.n_layer}x{cfg.n_embd}, context {cfg.block_size}, batch {cfg.batch_size}, lr {cfg.lr:g} -> "
          f"{cfg.final_lr:g}, warmup {cfg.warmup_steps}, {cfg.max_steps} steps, dropout {cfg.dropout}")
    ref = reference(options)
    with tempfile.TemporaryDirectory() as tmp:
        ours = runner(options, Path(tmp))
    print(f"{'step':>6} {'reference':>10} {'train':>10} {'train-ref':>10}")
    for step in sorted(ref):
        print(f"{step:>6} {ref[step]:>10.4f} {ours[step]:>10.4f} {ours[step] - ref[step]:>+10.4f}")


if __name__ == "__main__":
    main()
