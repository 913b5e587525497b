"""The training loop: a task (the built-in GPT, or yours) + AdamW + warmup/cosine, with the
checkpoint store as its first client.

    train                                   # the demo: default model, built-in corpus, a few minutes on CPU
    train --task examples/digits.py         # your model and data (see task.py)
    train --resume latest                   # continue bitwise-exactly where it stopped

State lives in plain view on the Trainer. Nothing a step does depends on hidden state: the
learning rate is a function of the step and the options, the samples it reads are a function of
the order's (epoch, index), and the dropout masks of micro-batch k are drawn from a seed made of
(seed, step, k). So a checkpoint, which holds the model, the optimizer and those counters after the
last finished step, resumes bit for bit, and with another number of ranks every step still reads
the same samples with the same masks.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Protocol

import torch

from . import distributed, parallel
from .checkpoint import CheckpointError, CheckpointManager, load_checkpoint, sharded
from .config import ConfigError, DataError, TrainConfig, batch_split
from .metrics import MetricsLogger
from .save_points import SavePoints
from .signals import GracefulStop
from .state import as_plain_rng_state, restore_rng_state, snapshot_rng
from .task import Task, to_device
from .workloads import TaskWorkload

logger = logging.getLogger("train_improved")


class Progress(Protocol):
    def start(self, total: int, completed: int, unit: str) -> None: ...
    def update(self, step: int, **fields: float) -> None: ...
    def stop(self) -> None: ...


class NoProgress:
    def start(self, total: int, completed: int, unit: str) -> None: ...
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


def learning_rate(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (from 1): linear warmup, then cosine decay to cfg.final_lr.

    A pure function of the step and the options, set on the optimizer before every step as nanoGPT
    does: restoring an optimizer's state can never bring back an old schedule.
    """
    done = step - 1
    if done < cfg.warmup_steps:
        return cfg.lr * (done + 1) / cfg.warmup_steps
    progress = min(1.0, (done - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.final_lr + (cfg.lr - cfg.final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def micro_batch_seed(seed: int, step: int, k: int) -> int:
    """The torch seed of micro-batch `k` of step `step` (its dropout masks), whichever rank computes it."""
    digest = hashlib.blake2b(f"{seed}:{step}:{k}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class Trainer:
    def __init__(self, cfg: TrainConfig, *, progress: Progress | None = None, task: Task | None = None,
                 collect_shards: bool = False, upload_shards: Callable[[Path, str], None] | None = None) -> None:
        """Build data, model and optimizer of `task` (None: the built-in GPT); nothing is written until `run()`.

        Under --fsdp on nodes that do not share the checkpoint directory, `collect_shards`: rank 0
        collects every rank's shards (`sharded.ShardWriter(collect=True)`); or `upload_shards`: each
        node uploads its own to the mirror with it (`sharded.ShardWriter(upload=)`)."""
        self.cfg = cfg
        self.progress = progress or NoProgress()
        self.dist = distributed.from_environment()
        self.device = pick_device(cfg.device)
        if self.dist.enabled and self.device == "cuda":
            self.device = f"cuda:{self.dist.local_rank}"
            torch.cuda.set_device(self.device)
        distributed.init(self.dist, self.device)
        # --batch-size is global: every rank does its share, so N ranks follow the 1-rank schedule.
        self.grad_accum = batch_split(cfg.batch_size, cfg.mini_batch_size, self.dist.world_size)
        self.device_type = device_type = "cuda" if self.device.startswith("cuda") else self.device
        self.pin = device_type == "cuda"  # pinned batches make the copies to the GPU truly asynchronous
        ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
        self.autocast = (nullcontext() if cfg.dtype == "float32"
                         else torch.autocast(device_type=device_type, dtype=ptdtype))

        if task is None:
            from .gpt_task import builtin  # the default task, nothing the loop depends on

            task = builtin(cfg)
        self.workload = TaskWorkload(task, cfg, accum=self.grad_accum, device=self.device, pin=self.pin,
                                     rank=self.dist.rank, world=self.dist.world_size)
        self.order = self.workload.order  # the data position: which samples the next step reads
        self.step = 0  # optimizer steps completed
        self.epoch = 0  # the epoch of the last completed step
        self.total_steps = self._total_steps()
        self.raw_model = self.workload.model
        # A task's source digest and the metrics it reports: a resume compares the one and checks --metric
        # against the other before it restores anything.
        self.stored_args = {**cfg.stored_args(), **({"task_digest": task.digest, "task_metrics": self.workload.metric_names}
                                                    if not task.builtin else {})}
        if cfg.fsdp and not self.dist.enabled:
            raise ConfigError("--fsdp shards the model across processes: run it under torchrun "
                              "(torchrun --nproc_per_node N -m train_improved --fsdp ...)")
        self.model = parallel.wrap(self.raw_model, self.dist, fsdp=cfg.fsdp, units=self.workload.shard_units())
        # Under --fsdp every rank writes its own shards, in the background: see _checkpoint.
        self.shard_writer = sharded.ShardWriter(collect=collect_shards, upload=upload_shards) if cfg.fsdp else None
        # Checkpoints always hold the raw module's state_dict: no "_orig_mod." or "module." prefix.
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.optimizer = self.workload.optimizer(device_type)
        self.scaler = torch.amp.GradScaler(device_type, enabled=cfg.dtype == "float16")

        self.train_loss: float | None = None
        self.val_loss: float | None = None
        self.val_metrics: dict[str, float] = {}  # the task's held-out metrics at the last evaluation
        self.last_eval_step = 0
        self.epoch_ended = False  # the last step finished an epoch
        self._prefetched: tuple[tuple[int, int], Any] | None = None
        self.step_time: float | None = None  # seconds per step (moving average), for --checkpoint-freq auto
        self.updating = False  # inside the optimizer update: the state is not consistent
        self.manager: CheckpointManager | None = None
        self.metrics: MetricsLogger | None = None
        self.saves = SavePoints(self)  # when to save, and how the run ends

    def _total_steps(self) -> int:
        """The last step of the run: the end of --num-epochs from the sampler's position, or --max-steps."""
        end = self.step + self.order.steps_left(self.cfg.num_epochs)
        return end if self.cfg.max_steps is None else min(self.cfg.max_steps, end)

    def describe(self) -> list[str]:
        """The start-up banner: what is trained, on what, and where it is saved."""
        cfg, d = self.cfg, self.dist
        ranks = f" x {d.world_size} ranks ({'FSDP2' if cfg.fsdp else 'DDP'})" if d.enabled else ""
        data, model = self.workload.describe(self.device)
        return [
            data, model + ranks,
            f"schedule: steps {self.step + 1}-{self.total_steps}, batch {cfg.batch_size} {self.workload.batch_unit}, "
            f"{self.order.steps_per_epoch} steps per epoch, lr {cfg.lr:g} -> {cfg.final_lr:g}"
            if self.total_steps > self.step else
            f"schedule: nothing to train: the run already ended at step {self.step} "
            f"({'--max-steps' if cfg.max_steps is not None and cfg.max_steps <= self.step else '--num-epochs'} "
            f"reached); give a larger --max-steps or --num-epochs to train on",
            f"checkpoints: {Path(cfg.checkpoint_dir).resolve()}; metrics: {cfg.metrics_path}",
        ]

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything that determines the rest of the run, as plain data (weights_only-loadable).

        Under --fsdp, `model` and `optimizer["state"]` hold this rank's shards (DTensors) and
        `_checkpoint` writes them with DCP; everything else is the same as without it. Nothing in it
        belongs to one rank, so any number of ranks can continue it.
        """
        cfg = self.cfg
        model_state, optimizer_state = parallel.state_dicts(self.raw_model, self.optimizer, fsdp=cfg.fsdp)
        data = self.order.state_dict()
        state = {
            "step": self.step,
            "epoch": self.epoch,
            "model": model_state,
            "optimizer": optimizer_state,
            # The schedule itself is `learning_rate(options, step)`: recorded for readers, never restored.
            "scheduler": {"name": "linear_warmup_cosine", "lr": cfg.lr, "min_lr": cfg.final_lr,
                          "warmup_steps": cfg.warmup_steps, "total_steps": self.total_steps,
                          "last_lr": learning_rate(cfg, self.step, self.total_steps) if self.step else 0.0},
            "train_loss": self.train_loss,
            "val_loss": self.val_loss,
            "val_metrics": self.val_metrics,
            "best_val_loss": self.manager.best_value if self.manager is not None else None,  # of --metric
            "last_eval_step": self.last_eval_step,
            "args": self.stored_args,
            "world_size": self.dist.world_size,
            "rng_state": as_plain_rng_state(snapshot_rng()),
            # Evaluation reads a fixed set of windows, so the validation position is always its start.
            "dataloader_state": {"train_epoch": data["epoch"], "train_index": data["index"],
                                 "train_curr_shard": data.get("curr_shard", 0), "train_curr_pos": data.get("curr_pos", 0),
                                 "train_fingerprint": self.workload.fingerprint, "val_curr_shard": 0, "val_curr_pos": 0},
            "checkpoint_freq_auto": self.saves.state_dict(),
        }
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any], path: Path | None = None) -> None:
        """Restore a checkpoint's state; `path` is where it came from (a sharded one keeps its tensors there)."""
        if bool(state.get("sharded")) != self.cfg.fsdp:
            written = "with --fsdp (a sharded directory)" if state.get("sharded") else "without --fsdp"
            raise CheckpointError(f"the checkpoint was written {written}; resume it the same way")
        if "dataloader_state" not in state or "train_index" not in state["dataloader_state"]:
            raise CheckpointError("the checkpoint holds no data position of this version of train_improved "
                                  "(written before shuffled sampling, or by another program)")
        # The options of this run decide the hyperparameters: the saved param_groups carry the old ones.
        chosen = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        if self.cfg.fsdp:
            assert path is not None
            parallel.load_sharded(self.raw_model, self.optimizer, path, state["optimizer"]["param_groups"])
        else:
            parallel.load_full_weights(self.raw_model, state["model"], fsdp=False)
            try:
                self.optimizer.load_state_dict(state["optimizer"])
            except ValueError as e:  # a task whose parameter groups changed
                raise CheckpointError(f"the checkpoint's optimizer does not fit this model: {e}") from None
        for group, options in zip(self.optimizer.param_groups, chosen, strict=True):
            group.update(options)
        if self.scaler.is_enabled() and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        data = state["dataloader_state"]
        self.order.load_state_dict({"epoch": data["train_epoch"], "index": data["train_index"]})
        if data.get("train_fingerprint") != self.workload.fingerprint:
            self.order.restart()
            logger.warning("the training data differs from the checkpoint's: continuing from step %d on this data "
                           "from the start of a new epoch (%d); weights, optimizer and step are kept",
                           int(state["step"]), self.order.epoch)
        self.step, self.epoch = int(state["step"]), int(state.get("epoch") or 0)
        self.train_loss, self.val_loss = state.get("train_loss"), state.get("val_loss")
        self.val_metrics = dict(state.get("val_metrics") or {})
        self.last_eval_step = int(state.get("last_eval_step", self.step))
        auto = state.get("checkpoint_freq_auto") or {}
        self.saves.load_state_dict(auto)
        if self.cfg.checkpoint_freq == "auto":
            self.step_time = auto.get("step_time")
        restore_rng_state(state["rng_state"])
        self.total_steps = self._total_steps()
        self._prefetched = None

    # ------------------------------------------------------------------ steps

    def _batch(self, micro: int) -> Any:
        """This rank's micro-batch `micro` of the next step, on the device (copied asynchronously on CUDA)."""
        k = micro * self.dist.world_size + self.dist.rank
        return to_device(self.workload.train_batch(k), self.device, non_blocking=True)

    def train_step(self, stop: GracefulStop) -> float | None:
        """One optimizer step; None if a stop request abandoned it (nothing was updated)."""
        cfg, accum, step = self.cfg, self.grad_accum, self.step + 1
        lr = learning_rate(cfg, step, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        position = (self.order.epoch, self.order.index)
        batch = self._prefetched[1] if self._prefetched and self._prefetched[0] == position else self._batch(0)
        self._prefetched = None
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(accum):
            if distributed.any_rank(self.dist, stop.requested, self.device):
                self.optimizer.zero_grad(set_to_none=True)
                return None
            torch.manual_seed(micro_batch_seed(cfg.seed, step, micro * self.dist.world_size + self.dist.rank))
            with parallel.gradient_sync(self.model, self.raw_model, self.dist, fsdp=cfg.fsdp, last=micro == accum - 1):
                with self.autocast:
                    loss = self.workload.loss(self.model, batch)
                if micro + 1 < accum:
                    batch = self._batch(micro + 1)  # the host prepares the next batch while the device computes
                loss = loss / accum  # the gradient of the mean over the whole batch
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        self.updating = True  # an exception from here on leaves model and optimizer half-updated
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)  # flush the gradients now, no need for this memory
        self.updating = False
        self.step, self.epoch = step, self.order.epoch
        self.epoch_ended = self.order.advance()
        self._prefetched = ((self.order.epoch, self.order.index), self._batch(0))  # while the update runs
        return distributed.mean(self.dist, loss_sum)  # the one host-device sync of a step

    @torch.no_grad()
    def evaluate(self, stop: GracefulStop) -> dict[str, float] | None:
        """The held-out loss and the workload's metrics, means over its fixed held-out samples; None if a stop
        cut it short.

        The samples are spread evenly over the whole held-out set and are the same at every
        evaluation, whatever the number of ranks, so values compare across evaluations, resumes and
        world sizes. In eval mode dropout draws no random numbers.
        """
        self.model.eval()
        n, world, names = self.workload.eval_count, self.dist.world_size, ["loss", *self.workload.metric_names]
        # Micro-batch k goes to rank k mod world; a rank without one in the last round still runs one
        # (FSDP's forward is a collective), uncounted.
        ks = [round_ * world + self.dist.rank for round_ in range(-(-n // world))]
        totals = torch.zeros(len(names) + 1, dtype=torch.float64, device=self.device)  # sums, then the count
        for k, (batch, size) in zip(ks, self.workload.eval_batches([min(k, n - 1) for k in ks]), strict=True):
            if distributed.any_rank(self.dist, stop.requested, self.device):
                self.model.train()
                return None
            with self.autocast:
                values = self.workload.eval_metrics(self.model, to_device(batch, self.device, non_blocking=True))
            if k < n:
                for i, name in enumerate(names):
                    totals[i] += torch.as_tensor(values[name]).to(self.device, torch.float64).reshape(()) * size
                totals[-1] += size
        self.model.train()
        sums = distributed.totals(self.dist, totals)
        return {("val_loss" if name == "loss" else name): sums[i] / sums[-1] for i, name in enumerate(names)}

    # ------------------------------------------------------------------ the loop

    def run(self, stop: GracefulStop, manager: CheckpointManager | None, metrics: MetricsLogger) -> int:
        """Train to the end or until stopped; return the process exit code.

        `manager` is None on every rank but 0: those ranks take part in the collectives of a save
        and wait at a barrier while rank 0 writes.
        """
        cfg = self.cfg
        self.manager, self.metrics = manager, metrics
        if manager is not None and cfg.warmup_steps >= self.total_steps > self.step:
            logger.warning("--warmup-steps %d is not shorter than the run (%d steps): the learning rate never "
                           "reaches --lr %g", cfg.warmup_steps, self.total_steps, cfg.lr)
        rate_key, per_step = self.workload.throughput  # tokens or samples per step
        self.progress.start(self.total_steps, self.step, unit="tok/s" if rate_key == "tokens_per_s" else "samples/s")
        saves = self.saves
        saves.announce()
        try:
            if self.eval_due(self.step) and self.last_eval_step < self.step:
                saves.evaluate_and_save(stop)  # an evaluation a stop cut short is redone first
            # Every stop decision is collective (train_step and evaluate agree before each batch), so
            # under torchrun all ranks leave this loop at the same step.
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                loss = self.train_step(stop)
                if loss is None:
                    break
                dt = time.perf_counter() - t0
                self.step_time = dt if self.step_time is None else 0.9 * self.step_time + 0.1 * dt
                self.train_loss = loss
                lr = self.optimizer.param_groups[0]["lr"]
                metrics.log("step", step=self.step, epoch=self.epoch, loss=loss, lr=lr, **{rate_key: per_step / dt})
                mirror = manager.mirror if manager is not None else None
                self.progress.update(self.step, loss=loss, lr=lr, rate=per_step / dt,
                                     **({"mirror_lag": mirror.lag(self.step)} if mirror is not None else {}))
                saves.after_step(stop)
            signum = saves.agreed_signal(stop)
            if signum is not None:
                return saves.emergency_stop(signum, since=stop.at)
            return saves.finish()
        except Exception:
            saves.emergency_after_crash()
            raise
        finally:
            self.progress.stop()
            self.workload.close()  # DataLoader workers stop now, not in the interpreter's teardown

    def evaluate_and_record(self, stop: GracefulStop) -> dict[str, float] | None:
        """Evaluate, keep the values as the run's latest and log them; None if a stop cut it short."""
        measured = self.evaluate(stop)
        if measured is not None:
            self.val_loss, self.last_eval_step = measured["val_loss"], self.step
            self.val_metrics = {k: v for k, v in measured.items() if k != "val_loss"}
            assert self.metrics is not None
            self.metrics.log("eval", step=self.step, **measured)
        return measured

    def eval_due(self, step: int) -> bool:
        return step > 0 and (step % self.cfg.eval_interval == 0 or step == self.total_steps)

    def metrics_now(self) -> dict[str, float]:
        """What --metric can choose from, as measured so far."""
        measured = {k: v for k, v in (("val_loss", self.val_loss), ("train_loss", self.train_loss)) if v is not None}
        return {**measured, **self.val_metrics}

    # ------------------------------------------------------------------ the end of the demo

    def sample(self, length: int) -> str | None:
        """A short sample from the best model of this line of training, if the task makes one (`sample`)."""
        if length <= 0 or self.manager is None or self.cfg.fsdp or not self.workload.task.has("sample"):
            return None  # under --fsdp rank 0 holds only a shard of the model
        best = self.manager.best()
        if best is not None and best.ok and self.manager.on_current_line(best):
            try:
                state, _ = load_checkpoint(best.path, map_location=self.device)
                self.raw_model.load_state_dict(state["model"])
            except CheckpointError as e:
                logger.warning("sampling from the last model instead of %s: %s", best.name, e)
        return self.workload.sample(length, seed=self.cfg.seed)
