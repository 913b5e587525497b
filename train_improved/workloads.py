"""What the trainer trains: a task (task.py), the built-in GPT (gpt_task.py) or yours, on its datasets.

The workload gives the trainer a model, an optimizer, a `SampleOrder` (the data position checkpoints
store), this rank's training micro-batches read by DataLoader workers, a loss, and held-out
metrics. The trainer does the rest (schedule, accumulation, ranks, evaluation, saves).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from .config import TrainConfig
from .samples import KeyedSamples, SampleOrder, StepLoader, evenly_spread, make_loader
from .task import Task, TaskError


def adamw_kernels(device_type: str) -> dict[str, bool | None]:
    """Fused into one kernel on CUDA (as nanoGPT), multi-tensor (foreach) elsewhere."""
    fused = device_type == "cuda"
    return {"fused": fused, "foreach": None if fused else True}


class TaskWorkload:
    """A task (see task.py), read by DataLoader workers in the runner's resumable order."""

    def __init__(self, task: Task, cfg: TrainConfig, *, device: str, pin: bool, rank: int, world: int,
                 accum: int) -> None:
        self.task, self.cfg, self.device, self.pin, self.rank, self.world = task, cfg, device, pin, rank, world
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        model, self.train_set, self.held_out = task.build()
        self.model = model.to(device)
        self.metric_names = task.try_once(self.model, self.train_set, self.held_out, device, cfg.seed)
        self.order = SampleOrder(self.train_set, cfg.batch_size, cfg.seed)
        if self.order.steps_per_epoch == 0:
            raise TaskError(f"{task.label}: the training set holds {len(self.train_set)} samples, fewer "
                            f"than one step's --batch-size {cfg.batch_size}")
        self.collate = task.module.collate if task.has("collate") else None
        self.workers = cfg.num_workers if cfg.num_workers is not None else 0 if task.builtin else 2
        self.loader = StepLoader(self.train_set, self.order, rank=rank, world=world, accum=accum,
                                 size=cfg.mini_batch_size, workers=self.workers, pin=pin, collate=self.collate)
        wanted = min(len(self.held_out), cfg.eval_steps * cfg.mini_batch_size)
        self.eval_indices = evenly_spread(len(self.held_out), wanted)
        self.eval_count = math.ceil(wanted / cfg.mini_batch_size)

    @property
    def fingerprint(self) -> str:
        """What a resume compares to see other data: the training set's `fingerprint`, else its size."""
        return str(getattr(self.train_set, "fingerprint", f"{len(self.train_set)} samples"))

    def describe(self, device: str) -> list[str]:
        held_out = f"{len(self.held_out):,} held out ({len(self.eval_indices)} per evaluation)"
        data = getattr(self.train_set, "description", "") or \
            f"task {self.task.name}: {len(self.train_set):,} training samples, {held_out}"
        if self.task.has("describe"):
            model = self.task.call("describe", self.model, self.task.options)
        else:
            options = ", ".join(f"{k}={v}" for k, v in vars(self.task.options).items())
            model = f"{type(self.model).__name__}, {sum(p.numel() for p in self.model.parameters()):,} parameters" \
                    f"{f' ({options})' if options else ''}"
        return [f"data: {data}", f"model: {model}, {self.cfg.dtype} on {device}"]

    @property
    def _tokens_per_sample(self) -> int | None:
        return getattr(self.train_set, "tokens_per_sample", None)

    @property
    def batch_unit(self) -> str:
        return f"x {self._tokens_per_sample} tokens" if self._tokens_per_sample else "samples"

    @property
    def throughput(self) -> tuple[str, int]:
        """What the step records count per second (tokens where the samples say how many) and per step."""
        if self._tokens_per_sample:
            return "tokens_per_s", self.cfg.batch_size * self._tokens_per_sample
        return "samples_per_s", self.cfg.batch_size

    def shard_units(self) -> list[torch.nn.Module]:
        """Under --fsdp, each of these is sharded on its own, then the root: the task's `fsdp_units(model)`
        (typically its transformer blocks, one all-gather each), else the root alone."""
        if not self.task.has("fsdp_units"):
            return []
        units = self.task.call("fsdp_units", self.model)
        if not isinstance(units, (list, tuple)) or not all(isinstance(u, torch.nn.Module) for u in units):
            raise TaskError(f"{self.task.label}: fsdp_units() must return a list of the model's modules")
        return list(units)

    def optimizer(self, device_type: str) -> torch.optim.Optimizer:
        wd = self.cfg.weight_decay
        if self.task.has("param_groups"):
            groups = self.task.call("param_groups", self.model, wd)
        else:  # as nanoGPT: decay matrices and embeddings, not biases and norm gains
            params = [p for p in self.model.parameters() if p.requires_grad]
            groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": wd},
                      {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=self.cfg.lr, betas=(0.9, 0.95),
                                 **adamw_kernels(device_type))

    def train_batch(self, k: int) -> Any:
        return self.loader.micro_batch(k)

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        return self.task.module.loss(model, batch)

    def eval_batches(self, ks: list[int]) -> Iterator[tuple[Any, int]]:
        m = self.cfg.mini_batch_size
        keys = [[(0, i) for i in self.eval_indices[k * m:(k + 1) * m]] for k in ks]
        loader = make_loader(KeyedSamples(self.held_out, self.cfg.seed, by_epoch=False), keys, workers=self.workers,
                             pin=self.pin, collate=self.collate)
        for batch, chunk in zip(loader, keys, strict=True):
            yield batch, len(chunk)

    def eval_metrics(self, model: torch.nn.Module, batch: Any) -> dict[str, Any]:
        found = {"loss": self.task.module.loss(model, batch)}
        if self.metric_names:
            found.update(self.task.module.metrics(model, batch))
        return found

    def sample(self, length: int, seed: int) -> str | None:
        """The task's `sample(model, length, seed)`: text shown at the end of a run, if it has one."""
        return self.task.module.sample(self.model, length, seed) if self.task.has("sample") else None

    def close(self) -> None:
        self.loader.close()
