"""Your own training loop on train_improved's checkpoint store: rolling, best, SIGTERM, exact resume.

    python examples/custom_loop.py --steps 300 --dir ckpt     # stop it (Ctrl+C, kill -TERM), run it again

It uses only the documented API (`train_improved.checkpoint`, see CHECKPOINTING.md), the way
nanoGPT's train.py would: a model, an optimizer, and a loop. A stop request finishes the current
step, writes an emergency checkpoint within a deadline and exits 128 + the signal; the next run
continues from it, and the final weights are bitwise those of a run that was never stopped.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from train_improved.checkpoint import CheckpointManager, CheckpointOptions, GracefulStop, Kind, NoCheckpointError

TRUE_W = torch.linspace(-1, 1, 16).unsqueeze(1)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The data of a step is a function of the step, so a resumed run reads exactly what it would have."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(64, 16, generator=g)
    return x, x @ TRUE_W + 0.1 * torch.randn(64, 1, generator=g)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--dir", default="ckpt")
    parser.add_argument("--step-delay", type=float, default=0.0, help="seconds of extra work per step")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def state(step: int) -> dict:  # plain data: save() refuses anything torch.load(weights_only=True) would
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}

    options = CheckpointOptions(keep_rolling=3, save_every=25, metric="val_loss", mode="min")
    with CheckpointManager(args.dir, options) as ckpt, GracefulStop() as stop:
        start = 1
        try:
            saved, info = ckpt.restore("latest")  # verified; falls back loudly if the file is damaged
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            start = saved["step"] + 1
            print(f"resumed from {info.name} at step {saved['step']}", flush=True)
        except NoCheckpointError:
            pass
        for step in range(start, args.steps + 1):
            if stop.requested:  # the handler only set a flag: the state after step - 1 is consistent
                ckpt.emergency_save(state(step - 1), step=step - 1, budget=25.0)
                print(f"stopped by signal {stop.signum}: emergency checkpoint at step {step - 1}", flush=True)
                return 128 + stop.signum
            x, y = batch(step)
            loss = torch.nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            time.sleep(args.step_delay)  # stands for a bigger model's step
            kinds, metrics = [], None
            if ckpt.should_save(step):
                kinds.append(Kind.ROLLING)
            if step % 50 == 0:
                with torch.no_grad():
                    metrics = {"val_loss": torch.nn.functional.mse_loss(model(batch(-1)[0]), batch(-1)[1])}  # 0-d ok
                if ckpt.is_improvement(metrics):
                    kinds.append(Kind.BEST)
            if kinds:
                ckpt.save(state(step), step=step, kinds=kinds, metrics=metrics)
            for result in ckpt.poll():  # background saves that finished meanwhile
                if result.error:
                    print(f"save failed: {result.error}", file=sys.stderr)
        if ckpt.latest_step() != args.steps:
            ckpt.save(state(args.steps), step=args.steps, kinds=Kind.ROLLING)
        for result in ckpt.close():  # the last save's outcome
            if result.error:
                print(f"final save failed: {result.error}", file=sys.stderr)
                return 3
    print(f"done: step {args.steps}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
