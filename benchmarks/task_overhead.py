#!/usr/bin/env python3
"""The runner's step time on a task against a bare loop over the same DataLoader and model, same run.

The bare loop is what a user would write: a `DataLoader` (the runner's own, same workers, same
per-sample seeding) feeding the task's model, `loss`, backward and AdamW. The runner is `train
--task` with its checkpointing on (rolling saves, the best triple, epoch files, evaluations). Both
read the same batches; rounds alternate, and each figure is the median over its rounds.

    python benchmarks/task_overhead.py --task examples/digits.py --steps 200 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from train_improved import config
from train_improved.checkpoint import CheckpointManager
from train_improved.metrics import MetricsLogger
from train_improved.samples import KeyedSamples, SampleOrder, _Keys, make_loader
from train_improved.session import checkpoint_options
from train_improved.signals import GracefulStop
from train_improved.task import load_task
from train_improved.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def options(task: str, steps: int, workers: int, workdir: Path) -> config.TrainConfig:
    loaded = load_task(task)
    return config.resolve(cli={"task": task, "max_steps": steps, "num_workers": workers, "eval_interval": 50,
                               "checkpoint_freq": 100, "metric": "val_loss", "checkpoint_dir": str(workdir / "ck"),
                               "metrics_file": str(workdir / "metrics.jsonl")},
                          environ={}, config_file=None, task_defaults=getattr(loaded.module, "DEFAULTS", {}))


def bare_loop(cfg: config.TrainConfig) -> list[float]:
    """Seconds per step of the loop a user would write around the same model and batches."""
    task = load_task(cfg.task)  # type: ignore[arg-type]
    torch.manual_seed(cfg.seed)
    model, train, _ = task.build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    order = SampleOrder(train, cfg.batch_size, cfg.seed)
    batches = iter(make_loader(KeyedSamples(train, cfg.seed), _Keys(order, 0, 1, 1, cfg.batch_size),
                               workers=cfg.num_workers, pin=False, collate=None))
    times = []
    for _ in range(cfg.max_steps or 0):
        t0 = time.perf_counter()
        loss = task.module.loss(model, next(batches))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the runner reads the loss every step too
        times.append(time.perf_counter() - t0)
    return times


def runner(cfg: config.TrainConfig) -> tuple[list[float], float]:
    """Seconds per step as the runner logs them, and its whole wall time per step (evaluations and saves too)."""
    trainer = Trainer(cfg, task=load_task(cfg.task))  # type: ignore[arg-type]
    started = time.perf_counter()
    with CheckpointManager(cfg.checkpoint_dir, checkpoint_options(cfg)) as m, GracefulStop() as stop:
        trainer.run(stop, m, MetricsLogger(cfg.metrics_path))
    wall = (time.perf_counter() - started) / (cfg.max_steps or 1)
    import json

    records = [json.loads(line) for line in cfg.metrics_path.read_text().splitlines()]
    return [cfg.batch_size / r["samples_per_s"] for r in records if r["event"] == "step"], wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default=str(ROOT / "examples" / "digits.py"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    bare, run, wall = [], [], []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = options(args.task, args.steps, args.workers, Path(tmp))
            bare.append(statistics.median(bare_loop(cfg)[5:]))  # after the workers' start
            steps, seconds = runner(cfg)
            run.append(statistics.median(steps[5:]))
            wall.append(seconds)
        print(f"round {r + 1}: bare {bare[-1] * 1e3:.2f} ms/step, runner {run[-1] * 1e3:.2f} ms/step "
              f"(wall {wall[-1] * 1e3:.2f} ms/step with evaluations and saves)", flush=True)
    b, s, w = statistics.median(bare), statistics.median(run), statistics.median(wall)
    print(f"\n{Path(args.task).name}, {args.steps} steps, batch {cfg.batch_size}, {args.workers} workers, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} rounds")
    print(f"bare loop          {b * 1e3:8.2f} ms/step")
    print(f"runner             {s * 1e3:8.2f} ms/step   ratio {s / b:.3f}")
    print(f"runner, all in     {w * 1e3:8.2f} ms/step   ratio {w / b:.3f}  (evaluations, saves, epoch files)")


if __name__ == "__main__":
    main()
