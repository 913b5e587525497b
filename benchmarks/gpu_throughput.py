#!/usr/bin/env python3
"""Tokens/s of `train` vs a bare nanoGPT-style loop of the same model, optimizer and data, same device.

The bare loop is what nanoGPT's train.py does per step: lr set from the step, forward and
backward per micro-batch with the next batch fetched in between (random windows, pinned host
memory, non-blocking copies on CUDA), gradient clipping, AdamW (fused on CUDA), one loss read.
The runner is `Trainer.run` with its metrics, progress and store; its step time is the wall time
between consecutive step records. Both run in this process, alternating rounds, eager and (with
--compile) compiled; the medians are compared. Then one runner round saves every --save-every
steps asynchronously and reports the loop's stall per save against the step time.

    python benchmarks/gpu_throughput.py                                # on a GPU: 12 x 768, context 1024, bf16 (< 4 min)
    python benchmarks/gpu_throughput.py --preset demo --device cpu     # the CPU demo's size
    python benchmarks/gpu_throughput.py --preset tiny --device cpu --steps 8 --rounds 1 --no-compile   # a smoke run
    python benchmarks/gpu_throughput.py --no-compile --rounds 1 --steps 20 --profile /tmp/prof   # where the time goes

--profile DIR runs one bare and one runner round (eager) under torch.profiler instead of the
measurement: it prints each side's busiest operators and syncs, and writes both traces to DIR
(bare.json.gz, runner.json.gz; open them in Perfetto).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from train_improved.checkpoint import CheckpointManager, CheckpointOptions
from train_improved.config import resolve
from train_improved.metrics import MetricsLogger
from train_improved.signals import GracefulStop
from train_improved.trainer import Trainer, learning_rate

PRESETS = {  # options of `train`
    "gpu": {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024, "batch_size": 16,
            "mini_batch_size": 16, "dtype": "bfloat16"},
    "demo": {},  # the defaults: what `train` with no options runs
    "tiny": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32, "batch_size": 4, "mini_batch_size": 2},
}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def runner_round(options: dict, steps: int, workdir: Path, save_every: int | None) -> tuple[list[float], list[float]]:
    """Per-step wall times of `train` (after 5 warm-up steps), and the loop's stall of each save."""
    cfg = resolve(cli={**options, "max_steps": steps, "eval_interval": 10**6,
                       "checkpoint_freq": save_every or 10**6, "checkpoint_dir": str(workdir / "ck"),
                       "metrics_file": str(workdir / "m.jsonl"), "sample_length": 0}, environ={}, config_file=None)
    trainer = Trainer(cfg)
    opts = CheckpointOptions(save_every=save_every)
    with CheckpointManager(cfg.checkpoint_dir, opts) as m, GracefulStop() as stop:
        trainer.run(stop, m, MetricsLogger(cfg.metrics_path))
    records = [json.loads(line) for line in cfg.metrics_path.read_text().splitlines()]
    times = [r["time"] for r in records if r["event"] == "step"]
    stalls = [r["stall_s"] for r in records if r["event"] == "checkpoint" and r["step"] < steps]
    return [b - a for a, b in zip(times[5:], times[6:], strict=False)], stalls


def bare_round(options: dict, steps: int) -> list[float]:
    cfg = resolve(cli=options, environ={}, config_file=None)
    trainer = Trainer(cfg)  # only for the identical model, optimizer, data and device
    model, opt, device = trainer.model, trainer.optimizer, trainer.device
    data = torch.from_numpy(trainer.workload.train_set.shards[0].astype("int64"))
    B, T, accum = cfg.mini_batch_size, cfg.block_size, trainer.grad_accum
    autocast = nullcontext() if cfg.dtype == "float32" else torch.autocast(
        trainer.device_type, dtype={"bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype])

    def get_batch() -> tuple[torch.Tensor, torch.Tensor]:  # nanoGPT's get_batch
        ix = torch.randint(len(data) - T - 1, (B,))
        x = torch.stack([data[i:i + T] for i in ix])
        y = torch.stack([data[i + 1:i + 1 + T] for i in ix])
        if device.startswith("cuda"):
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    out, last = [], None
    x, y = get_batch()
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, step, steps)
        for _ in range(accum):
            with autocast:
                _, loss = model(x, y)
                loss = loss / accum
            x, y = get_batch()  # fetched while the device computes
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # nanoGPT reads the loss back for logging: the one sync per step
        now = time.perf_counter()
        if last is not None and step > 5:
            out.append(now - last)
        last = now
    return out


def profiled(options: dict, steps: int, workdir: Path, out: Path) -> None:
    """One bare and one runner round under torch.profiler: their busiest operators, and the traces."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    out.mkdir(parents=True, exist_ok=True)
    for side, round_ in (("bare", lambda: bare_round(options, steps)),
                         ("runner", lambda: runner_round(options, steps, workdir / "profiled", None))):
        round_()  # warm-up: allocator, kernels, data workers
        started = time.perf_counter()
        with profile(activities=activities) as prof:
            round_()
        wall = time.perf_counter() - started
        prof.export_chrome_trace(str(out / f"{side}.json.gz"))
        busy = sum(e.self_device_time_total for e in prof.key_averages()) / 1e6  # kernels and copies
        print(f"\n== {side}: {steps} steps in {wall:.2f} s (profiled), device busy {busy:.2f} s; by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--save-every", type=int, default=10, help="steps between saves in the stall round")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--profile", type=Path, default=None, metavar="DIR", help="profile one round of each instead")
    args = ap.parse_args()
    options = {**PRESETS[args.preset], "device": args.device}
    if args.device == "cpu":
        options.pop("dtype", None)  # bf16 autocast on CPU measures the CPU's emulation, not the loop
    cfg = resolve(cli=options, environ={}, config_file=None)
    tokens = cfg.batch_size * cfg.block_size
    print(f"model {cfg.n_layer}x{cfg.n_embd}, context {cfg.block_size}, batch {cfg.batch_size}, {cfg.dtype}, "
          f"device {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else
                                     f", threads {torch.get_num_threads()}"))
    with tempfile.TemporaryDirectory() as tmp:
        if args.profile is not None:
            profiled({**options, "compile": False}, args.steps, Path(tmp), args.profile)
            return
        for compiled in ([False, True] if args.compile else [False]):
            mode = {**options, "compile": compiled}
            runner, bare = [], []
            for r in range(args.rounds):
                bare += bare_round(mode, args.steps)
                runner += runner_round(mode, args.steps, Path(tmp) / f"{compiled}{r}", None)[0]
            b, rn = statistics.median(bare), statistics.median(runner)
            print(f"{'compiled' if compiled else 'eager':8s}  bare {tokens / b:>10,.0f} tok/s ({1e3 * b:.1f} ms)   "
                  f"runner {tokens / rn:>10,.0f} tok/s ({1e3 * rn:.1f} ms)   runner/bare step time {rn / b:.3f}")
        steps, stalls = runner_round({**options, "compile": args.compile}, args.steps, Path(tmp) / "saves",
                                     args.save_every)
        if stalls:
            step = statistics.median(steps)
            print(f"async saves every {args.save_every} steps: stall median {1e3 * statistics.median(stalls):.1f} ms "
                  f"(max {1e3 * max(stalls):.1f} ms) = {statistics.median(stalls) / step:.2f} steps")


if __name__ == "__main__":
    main()
