"""The training loop: GPT + AdamW + warmup/cosine, with the checkpoint store as its first client.

    train                                   # the demo: default model, built-in corpus, a few minutes on CPU
    train --resume latest                   # continue bitwise-exactly where it stopped

State lives in plain view on the Trainer. After every optimizer step the loop records the
"boundary" (RNG states and data positions at that instant); every checkpoint is built from the
model, optimizer and scheduler, which change only inside the optimizer update, plus that boundary.
So a stop at any moment, mid-accumulation included, saves the exact state after the last finished
step, and resuming from it replays the rest of the run bit for bit.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Protocol

import torch

from . import distributed, parallel
from .checkpoint import CheckpointError, CheckpointManager, Kind, SaveResult, sharded
from .config import ConfigError, DataError, TrainConfig, format_duration
from .data import TokenLoader, load_dataset
from .metrics import MetricsLogger
from .model import GPT, GPTConfig
from .signals import GracefulStop
from .state import as_plain_rng_state, restore_rng_state, snapshot_rng

logger = logging.getLogger("train_improved")
AUTO_FIRST_INTERVAL = 250  # steps between rolling saves under --checkpoint-freq auto before any cost is known


class Progress(Protocol):
    def start(self, total: int, completed: int) -> None: ...
    def update(self, step: int, **fields: float) -> None: ...
    def stop(self) -> None: ...


class NoProgress:
    def start(self, total: int, completed: int) -> None: ...
    def update(self, step: int, **fields: float) -> None: ...
    def stop(self) -> None: ...


def pick_device(requested: str) -> str:
    if requested != "auto":
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise DataError(f"--device {requested}: CUDA is not available on this machine")
        if requested == "mps" and not torch.backends.mps.is_available():
            raise DataError("--device mps: MPS is not available on this machine")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def lr_multiplier(cfg: TrainConfig, total_steps: int):  # noqa: ANN201 - returns a plain function (LambdaLR saves no state for it)
    floor = cfg.min_lr / cfg.lr if cfg.lr else 1.0

    def multiplier(done: int) -> float:
        if done < cfg.warmup_steps:
            return (done + 1) / cfg.warmup_steps
        decay_steps = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (done - cfg.warmup_steps) / decay_steps)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


class Trainer:
    def __init__(self, cfg: TrainConfig, *, progress: Progress | None = None) -> None:
        """Build data, model and optimizer; nothing is written until `run()`."""
        self.cfg = cfg
        self.progress = progress or NoProgress()
        self.dist = distributed.from_environment()
        self.device = pick_device(cfg.device)
        if self.dist.enabled and self.device == "cuda":
            self.device = f"cuda:{self.dist.local_rank}"
            torch.cuda.set_device(self.device)
        distributed.init(self.dist, self.device)
        world = self.dist.world_size
        if cfg.batch_size % (cfg.mini_batch_size * world):
            raise ConfigError(f"--batch-size {cfg.batch_size} must be a multiple of --mini-batch-size "
                              f"{cfg.mini_batch_size} x {world} ranks")
        # --batch-size is global: every rank does its share, so N ranks follow the 1-rank schedule.
        self.grad_accum = cfg.batch_size // (cfg.mini_batch_size * world)
        device_type = "cuda" if self.device.startswith("cuda") else self.device
        ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
        self.autocast = (nullcontext() if cfg.dtype == "float32"
                         else torch.autocast(device_type=device_type, dtype=ptdtype))
        torch.manual_seed(cfg.seed)
        import random

        import numpy as np
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)

        self.dataset = load_dataset(cfg.data, vocab_size=cfg.vocab_size)
        ranks = {"rank": self.dist.rank, "world_size": world}
        self.train_loader = TokenLoader(self.dataset.train, cfg.mini_batch_size, cfg.block_size, name="train", **ranks)
        self.val_loader = TokenLoader(self.dataset.val, cfg.mini_batch_size, cfg.block_size, name="validation",
                                      **ranks)
        self.steps_per_epoch = self.train_loader.batches_per_pass // self.grad_accum
        if self.steps_per_epoch == 0:
            raise DataError(f"the training split holds {self.train_loader.batches_per_pass} mini-batches per rank, "
                            f"fewer than one optimizer step needs ({self.grad_accum}); lower --batch-size")
        epoch_steps = cfg.num_epochs * self.steps_per_epoch
        self.total_steps = epoch_steps if cfg.max_steps is None else min(cfg.max_steps, epoch_steps)

        self.model_config = GPTConfig(vocab_size=self.dataset.vocab_size, block_size=cfg.block_size,
                                      n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout)
        self.raw_model = GPT(self.model_config).to(self.device)
        if cfg.fsdp and not self.dist.enabled:
            raise ConfigError("--fsdp shards the model across processes: run it under torchrun with "
                              "--nproc_per_node 2 or more")
        self.model = parallel.wrap(self.raw_model, self.dist, fsdp=cfg.fsdp)
        # Under --fsdp every rank writes its own shards, in the background: see _checkpoint.
        self._shard_writer = sharded.ShardWriter() if cfg.fsdp else None
        if self.dist.enabled:
            torch.manual_seed(cfg.seed + self.dist.rank)  # same initial weights, but each rank its own dropout
        # Checkpoints always hold the raw module's state_dict: no "_orig_mod." or "module." prefix.
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.optimizer = self.raw_model.configure_optimizer(cfg.lr, cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_multiplier(cfg, self.total_steps))
        self.scaler = torch.amp.GradScaler(device_type, enabled=cfg.dtype == "float16")

        self.step = 0  # optimizer steps completed
        self.train_loss: float | None = None
        self.val_loss: float | None = None
        self.best_val_loss: float | None = None
        self.last_eval_step = 0
        # --checkpoint-freq auto starts at the default interval until a save has been timed.
        self._save_every = cfg.checkpoint_freq if isinstance(cfg.checkpoint_freq, int) else AUTO_FIRST_INTERVAL
        self._updating = False  # inside the optimizer update: the state is not consistent
        self._step_time: float | None = None  # seconds per step (moving average), for --checkpoint-freq auto
        self._last_save: SaveResult | None = None
        self._mark_boundary()

    # ------------------------------------------------------------------ state

    def _mark_boundary(self) -> None:
        # After every optimizer step: kept raw and cheap here, turned into plain data only by state_dict().
        self._boundary = {
            "rng_state": snapshot_rng(),
            "dataloader_state": {
                **{f"train_{k}": v for k, v in self.train_loader.state_dict().items()},
                **{f"val_{k}": v for k, v in self.val_loader.state_dict().items()},
            },
        }

    def epoch_of(self, step: int) -> int:
        return max(0, step - 1) // self.steps_per_epoch

    def state_dict(self) -> dict[str, Any]:
        """Everything that determines the rest of the run, as plain data (weights_only-loadable).

        Under --fsdp, `model` and `optimizer["state"]` hold this rank's shards (DTensors) and
        `_checkpoint` writes them with DCP; everything else is the same as without it.
        """
        model_state, optimizer_state = parallel.state_dicts(self.raw_model, self.optimizer, fsdp=self.cfg.fsdp)
        state = {
            "step": self.step,
            "epoch": self.epoch_of(self.step),
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict(),
            "train_loss": self.train_loss,
            "val_loss": self.val_loss,
            "best_val_loss": self.best_val_loss,
            "last_eval_step": self.last_eval_step,
            "args": self.cfg.to_dict(),
            "world_size": self.dist.world_size,
        }
        boundary = {"rng_state": as_plain_rng_state(self._boundary["rng_state"]),
                    "dataloader_state": dict(self._boundary["dataloader_state"])}
        state.update(boundary)
        if self.dist.enabled:  # a collective: every rank calls state_dict() at the same points
            state["rank_states"] = distributed.gather(self.dist, boundary)
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any], path: Path | None = None) -> None:
        """Restore a checkpoint's state; `path` is where it came from (a sharded one keeps its tensors there)."""
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.dist.world_size:
            raise CheckpointError(f"the checkpoint was written by {saved_world} rank(s) and this run has "
                                  f"{self.dist.world_size}; resume with the same number of processes (re-splitting "
                                  "the data and RNG streams across another world size is not supported)")
        if bool(state.get("sharded")) != self.cfg.fsdp:
            written = "with --fsdp (a sharded directory)" if state.get("sharded") else "without --fsdp"
            raise CheckpointError(f"the checkpoint was written {written}; resume it the same way")
        if self.cfg.fsdp:
            assert path is not None
            parallel.load_sharded(self.raw_model, self.optimizer, path, state["optimizer"]["param_groups"])
        else:
            try:
                self.raw_model.load_state_dict(state["model"])
            except RuntimeError as e:
                lines = str(e).splitlines()
                raise CheckpointError("the checkpoint's model does not fit this model shape: "
                                      f"{lines[1].strip() if len(lines) > 1 else e}") from None
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        if self.dist.enabled:
            state = {**state, **state["rank_states"][self.dist.rank]}
        data = state["dataloader_state"]
        self.train_loader.load_state_dict({"curr_shard": data["train_curr_shard"], "curr_pos": data["train_curr_pos"]})
        self.val_loader.load_state_dict({"curr_shard": data["val_curr_shard"], "curr_pos": data["val_curr_pos"]})
        self.step = int(state["step"])
        self.train_loss, self.val_loss = state.get("train_loss"), state.get("val_loss")
        self.best_val_loss = state.get("best_val_loss")
        self.last_eval_step = int(state.get("last_eval_step", self.step))
        restore_rng_state(state["rng_state"])
        self._mark_boundary()

    # ------------------------------------------------------------------ steps

    def train_step(self, stop: GracefulStop) -> float | None:
        """One optimizer step; None if a stop request abandoned it (nothing was updated)."""
        accum = self.grad_accum
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(accum):
            if distributed.any_rank(self.dist, stop.requested, self.device):
                self.optimizer.zero_grad(set_to_none=True)
                return None
            x, y = (t.to(self.device, non_blocking=True) for t in self.train_loader.next_batch())
            with parallel.gradient_sync(self.model, self.raw_model, self.dist, fsdp=self.cfg.fsdp,
                                        last=micro == accum - 1):
                with self.autocast:
                    _, loss = self.model(x, y)
                loss = loss / accum  # the gradient of the mean over the whole batch
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        self._updating = True  # an exception from here on leaves model and optimizer half-updated
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)  # flush the gradients now, no need for this memory
        self.scheduler.step()
        self._updating = False
        self.step += 1
        self._mark_boundary()
        return distributed.mean(self.dist, loss_sum.item(), self.device)

    @torch.no_grad()
    def evaluate(self, stop: GracefulStop) -> float | None:
        """Mean loss over --eval-steps held-out batches; None if a stop request cut it short.

        The batches are spread evenly over the whole held-out split (a prefix would be a few files)
        and are the same at every evaluation, so values compare across evaluations and resumes. In
        eval mode dropout draws no random numbers, so the training RNG stream is untouched.
        """
        self.model.eval()
        total = 0.0
        for position in self.val_loader.spread(self.cfg.eval_steps):
            if distributed.any_rank(self.dist, stop.requested, self.device):
                self.model.train()
                return None
            self.val_loader.load_state_dict(position)
            x, y = (t.to(self.device) for t in self.val_loader.next_batch())
            with self.autocast:
                _, loss = self.model(x, y)
            total += loss.item()
        self.model.train()
        self._boundary["dataloader_state"].update(
            {f"val_{k}": v for k, v in self.val_loader.state_dict().items()})
        return distributed.mean(self.dist, total / self.cfg.eval_steps, self.device)

    # ------------------------------------------------------------------ the loop

    def run(self, stop: GracefulStop, manager: CheckpointManager | None, metrics: MetricsLogger) -> int:
        """Train to the end or until stopped; return the process exit code.

        `manager` is None on every rank but 0: those ranks take part in the collectives of a save
        (gathering their RNG and data positions) and wait at a barrier while rank 0 writes.
        """
        cfg = self.cfg
        self.manager, self.metrics = manager, metrics
        self.progress.start(self.total_steps, self.step)
        if cfg.checkpoint_freq == "auto" and manager is not None:
            logger.info("checkpoint interval: every %d steps until a save has been timed (--checkpoint-freq auto, "
                        "MTBF %s)", self._save_every, format_duration(cfg.mtbf))
        tokens_per_step = cfg.batch_size * cfg.block_size
        try:
            if self._eval_due(self.step) and self.last_eval_step < self.step:
                self._evaluate_and_save(stop)  # an evaluation a stop cut short is redone first
            # Every stop decision is collective (train_step and evaluate agree before each batch), so
            # under torchrun all ranks leave this loop at the same step.
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                lr = self.optimizer.param_groups[0]["lr"]
                loss = self.train_step(stop)
                if loss is None:
                    break
                dt = time.perf_counter() - t0
                self._step_time = dt if self._step_time is None else 0.9 * self._step_time + 0.1 * dt
                self.train_loss = loss
                self.metrics.log("step", step=self.step, epoch=self.epoch_of(self.step), loss=loss, lr=lr,
                                 tokens_per_s=tokens_per_step / dt)
                self.progress.update(self.step, loss=loss, lr=lr, tokens_per_s=tokens_per_step / dt)
                self._after_step(stop)
            signum = self._agreed_signal(stop)
            if signum is not None:
                return self._emergency_stop(signum)
            self._wait_for_saves()
            self._save([Kind.ROLLING], final=True)  # latest.pt holds the final state
            self._wait_for_saves()
            distributed.barrier(self.dist)
            return 0
        except Exception:
            self._emergency_after_crash()
            raise
        finally:
            self.progress.stop()

    def _agreed_signal(self, stop: GracefulStop) -> int | None:
        """The stop signal any rank received, the same on every rank; None if none did."""
        seen = [s for s in distributed.gather(self.dist, stop.signum) if s is not None]
        return seen[0] if seen else None

    def _eval_due(self, step: int) -> bool:
        return step > 0 and (step % self.cfg.eval_interval == 0 or step == self.total_steps)

    def _wait_for_saves(self) -> None:
        if self._shard_writer is not None:
            self._shard_writer.wait()  # this rank's shards; rank 0's store waits for everyone's
        if self.manager is not None:
            self._log_results(self.manager.wait_until_finished())

    def _after_step(self, stop: GracefulStop) -> None:
        if self.manager is not None:
            self._log_results(self.manager.poll())
        kinds = []
        if self._eval_due(self.step):
            kinds += self._evaluate_and_save(stop, save=False)
        if self._save_every and self.step % self._save_every == 0:
            kinds.append(Kind.ROLLING)
        if self.step % self.steps_per_epoch == 0:
            kinds.append(Kind.EPOCH)
            self.train_loader.reset()  # the next epoch starts at the beginning; a partial batch is dropped
            self._mark_boundary()
        self._save(kinds)

    def _evaluate_and_save(self, stop: GracefulStop, save: bool = True) -> list[Kind]:
        val = self.evaluate(stop)
        if val is None:
            return []
        self.val_loss, self.last_eval_step = val, self.step
        if self.best_val_loss is None or val < self.best_val_loss:
            self.best_val_loss = val
        self.metrics.log("eval", step=self.step, val_loss=val)
        logger.info("step %d: val_loss %.4f (best %.4f)", self.step, val, self.best_val_loss)
        # Rank 0's store knows the best so far; every rank must take the same decision (a save is collective).
        improved = self.manager is not None and self.manager.is_improvement(self._metrics())
        kinds = [Kind.BEST] if distributed.any_rank(self.dist, improved, self.device) else []
        if save:
            self._save(kinds)
        return kinds

    def _metrics(self) -> dict[str, float]:
        return {k: v for k, v in (("val_loss", self.val_loss), ("train_loss", self.train_loss)) if v is not None}

    def _save(self, kinds: list[Kind], final: bool = False) -> None:
        if final:
            latest = self.manager.latest() if self.manager is not None else None
            committed = latest is not None and latest.ok and latest.step == self.step
            if distributed.any_rank(self.dist, committed, self.device):
                return  # the final state is already committed
        if not kinds:
            return
        self._checkpoint(kinds)
        if self.manager is not None:
            # The save just made (synchronous) or the one before it (async) is done: log it now, so
            # the auto interval below uses the newest measured cost.
            self._log_results(self.manager.poll())
            if self.cfg.checkpoint_freq == "auto":
                self._retune_checkpoint_freq()
        if self.dist.enabled:
            self._save_every = distributed.gather(self.dist, self._save_every)[0]  # rank 0 measured the cost
            distributed.barrier(self.dist)

    def _checkpoint(self, kinds: list[Kind], verify: bool = True) -> None:
        """Save the current state as `kinds`. Every rank calls this: gathering the state is collective.

        Rank 0 hands the state to the store. Under --fsdp every rank first starts writing its
        shards (DCP) into a staging directory that rank 0 names: the loop waits only for their copy
        to host memory, and the store commits once every rank's files are durable.
        """
        started = time.perf_counter()
        state = self.state_dict()
        shards = None
        if self._shard_writer is not None:
            tensors = sharded.split_tensors(state.pop("model"), state["optimizer"])
            state["sharded"] = True
            staging = sharded.staging_directory(Path(self.cfg.checkpoint_dir)) if self.dist.is_main else None
            shards = self._shard_writer.start(distributed.gather(self.dist, staging)[0], tensors)
        if self.manager is not None:
            self.manager.save(state, step=self.step, epoch=self.epoch_of(self.step), kinds=kinds,
                              metrics=self._metrics(), meta={"args": self.cfg.to_dict()}, verify=verify,
                              shards=shards, stall_before=time.perf_counter() - started)

    def _log_results(self, results: list[SaveResult]) -> None:
        assert self.manager is not None
        for r in results:
            if r.error:
                continue  # the store has already warned, naming the file and the cause
            self.metrics.log("checkpoint", step=r.step, kind=r.kind.value,
                             path=str(self.manager.directory / r.name), bytes=r.bytes,
                             stall_s=r.stall_s, write_s=r.write_s, cleanup_s=r.cleanup_s)
            self._last_save = r

    def _retune_checkpoint_freq(self) -> None:
        """--checkpoint-freq auto: Young's interval sqrt(2 * cost * MTBF), in steps, from measured costs."""
        if self._last_save is None or not self._step_time:
            return
        cost = max(self._last_save.stall_s, 1e-3)
        interval_s = math.sqrt(2 * cost * self.cfg.mtbf)
        every = max(1, round(interval_s / self._step_time))
        if every != self._save_every:
            logger.info("checkpoint interval: every %d steps (save cost %.3fs, MTBF %s)", every, cost,
                        format_duration(self.cfg.mtbf))
            self._save_every = every

    def _emergency_stop(self, signum: int) -> int:
        logger.warning("received %s: saving an emergency checkpoint at step %d", signal.Signals(signum).name, self.step)
        started = time.perf_counter()
        self._wait_for_saves()  # commits stay in order
        verify = True
        if self.manager is not None:
            expected = self.manager.expected_save_seconds()
            budget = self.cfg.emergency_budget
            verify = expected is None or expected <= budget
            if not verify:
                logger.warning("an emergency save is expected to take %.1fs, over --emergency-budget %.0fs: skipping "
                               "its read-back verification (its checksum is still checked on load)", expected, budget)
        self._checkpoint([Kind.EMERGENCY], verify=verify)
        if self.manager is None:
            distributed.barrier(self.dist)  # rank 0 commits the one emergency checkpoint
            return 128 + signum
        results = self.manager.wait_until_finished()
        self._log_results(results)
        if results and not any(r.error for r in results):
            logger.warning("emergency checkpoint %s written in %.1fs; resume with: train --resume latest",
                           results[0].name, time.perf_counter() - started)
        distributed.barrier(self.dist)
        return 128 + signum

    def _emergency_after_crash(self) -> None:
        if self.dist.enabled:
            # The other ranks may be blocked in a collective, so the per-rank state cannot be gathered;
            # torchrun stops them. latest.pt is the last consistent state.
            logger.error("training failed at step %d on rank %d; under torchrun no emergency checkpoint is "
                         "written after a crash: resume from latest.pt", self.step, self.dist.rank)
            return
        if self._updating or self.manager is None:
            logger.error("the error hit during the optimizer update, so the in-memory state is inconsistent: "
                         "no emergency checkpoint; latest.pt is intact")
            return
        logger.error("training failed at step %d: writing an emergency checkpoint before the traceback", self.step)
        try:
            self.manager.wait_until_finished()
            self._checkpoint([Kind.EMERGENCY])
            self._log_results(self.manager.wait_until_finished())
        except Exception as e:  # noqa: BLE001 - the original error matters more; report this one and go on
            logger.error("the emergency checkpoint also failed: %s", e)

    # ------------------------------------------------------------------ the end of the demo

    def sample(self, length: int) -> str | None:
        """A short text sample from the best model (byte-level data only)."""
        if length <= 0 or self.dataset.vocab_size != 256 or self.manager is None or self.cfg.fsdp:
            return None  # under --fsdp rank 0 holds only a shard of the model
        best = self.manager.best()
        if best is not None and best.ok:
            state, _ = self.manager.restore("best", map_location=self.device)
            self.raw_model.load_state_dict(state["model"])
        self.raw_model.eval()
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        prompt = torch.tensor([list(b"def ")], dtype=torch.long, device=self.device)
        out = self.raw_model.generate(prompt, length, generator=generator)
        return bytes(out[0].tolist()).decode("utf-8", errors="replace")
