"""What the trainer trains: the built-in GPT on token windows, or a user's task (task.py) on its datasets.

Both give the trainer the same few things: a model, an optimizer, a `SampleOrder` (the data
position checkpoints store), this rank's training micro-batches, a loss, and held-out metrics.
The trainer does the rest (schedule, accumulation, ranks, evaluation, saves) the same for both.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from .config import DataError, TrainConfig
from .data import ShuffledSampler, TokenWindows, load_dataset
from .model import GPT, GPTConfig, adamw_kernels, sample_text
from .samples import KeyedSamples, SampleOrder, StepLoader, evenly_spread, make_loader
from .task import Task, TaskError


class GPTWorkload:
    """The built-in GPT on the built-in corpus or the user's text or token shards."""

    def __init__(self, cfg: TrainConfig, *, device: str, pin: bool, rank: int, world: int) -> None:
        self.cfg, self.pin = cfg, pin
        self.dataset = load_dataset(cfg.data, vocab_size=cfg.vocab_size)
        self.order = ShuffledSampler(TokenWindows(self.dataset.train, cfg.block_size, name="train"),
                                     cfg.batch_size, cfg.seed)
        if self.order.steps_per_epoch == 0:
            raise DataError(f"the training split holds {self.order.windows.count} windows of --block-size "
                            f"{cfg.block_size}, fewer than one step's --batch-size {cfg.batch_size}")
        self.val_windows = TokenWindows(self.dataset.val, cfg.block_size, name="validation")
        self.eval_indices = evenly_spread(self.val_windows.count, cfg.eval_steps * cfg.mini_batch_size)
        self.eval_count = cfg.eval_steps
        self.metric_names: list[str] = []
        self.model_config = GPTConfig(vocab_size=self.dataset.vocab_size, block_size=cfg.block_size,
                                      n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = GPT(self.model_config).to(device)

    @property
    def fingerprint(self) -> str:
        return self.order.windows.fingerprint

    def describe(self, device: str) -> list[str]:
        cfg = self.cfg
        return [f"data: {self.dataset.summary()}",
                f"model: {self.model.num_params() / 1e6:.2f}M parameters ({cfg.n_layer} layers x {cfg.n_embd}, "
                f"{cfg.n_head} heads, context {cfg.block_size}), {cfg.dtype} on {device}"]

    @property
    def batch_unit(self) -> str:
        return f"x {self.cfg.block_size} tokens"

    @property
    def throughput(self) -> tuple[str, int]:
        return "tokens_per_s", self.cfg.batch_size * self.cfg.block_size

    def shard_units(self) -> list[torch.nn.Module]:
        return list(self.model.blocks)  # one all-gather per block, as in torchtitan

    def optimizer(self, device_type: str) -> torch.optim.Optimizer:
        return self.model.configure_optimizer(self.cfg.lr, self.cfg.weight_decay, device_type=device_type)

    def train_batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.order.micro_batch(k, self.cfg.mini_batch_size, pin=self.pin)

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return model(*batch)[1]

    def eval_batches(self, ks: list[int]) -> Iterator[tuple[Any, int]]:
        m = self.cfg.mini_batch_size
        for k in ks:
            yield self.val_windows.gather(self.eval_indices[k * m:][:m], pin=self.pin), m

    def eval_metrics(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
        return {"loss": model(*batch)[1]}

    def sample(self, length: int, seed: int) -> str | None:
        """A text sample (byte-level data only)."""
        if self.dataset.vocab_size != 256:
            return None
        return sample_text(self.model, b"\n", length, seed=seed)  # a line start: any text has one

    def close(self) -> None: ...


class TaskWorkload:
    """A user's task (see task.py), read by DataLoader workers in the runner's resumable order."""

    def __init__(self, task: Task, cfg: TrainConfig, *, device: str, pin: bool, rank: int, world: int,
                 accum: int) -> None:
        self.task, self.cfg, self.device, self.pin, self.rank, self.world = task, cfg, device, pin, rank, world
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        model, self.train_set, self.held_out = task.build()
        self.model = model.to(device)
        self.metric_names = task.try_once(self.model, self.train_set, self.held_out, device, cfg.seed)
        self.order = SampleOrder(len(self.train_set), cfg.batch_size, cfg.seed)
        if self.order.steps_per_epoch == 0:
            raise TaskError(f"--task {task.spec}: the training set holds {len(self.train_set)} samples, fewer "
                            f"than one step's --batch-size {cfg.batch_size}")
        self.collate = task.module.collate if task.has("collate") else None
        self.loader = StepLoader(self.train_set, self.order, rank=rank, world=world, accum=accum,
                                 size=cfg.mini_batch_size, workers=cfg.num_workers, pin=pin, collate=self.collate)
        wanted = min(len(self.held_out), cfg.eval_steps * cfg.mini_batch_size)
        self.eval_indices = evenly_spread(len(self.held_out), wanted)
        self.eval_count = math.ceil(wanted / cfg.mini_batch_size)

    @property
    def fingerprint(self) -> str:
        return f"{len(self.train_set)} samples"

    def describe(self, device: str) -> list[str]:
        params = sum(p.numel() for p in self.model.parameters())
        options = ", ".join(f"{k}={v}" for k, v in vars(self.task.options).items())
        return [f"data: task {self.task.name}: {len(self.train_set):,} training samples, "
                f"{len(self.held_out):,} held out ({len(self.eval_indices)} per evaluation)",
                f"model: {type(self.model).__name__}, {params:,} parameters"
                f"{f' ({options})' if options else ''}, {self.cfg.dtype} on {device}"]

    @property
    def batch_unit(self) -> str:
        return "samples"

    @property
    def throughput(self) -> tuple[str, int]:
        return "samples_per_s", self.cfg.batch_size

    def shard_units(self) -> list[torch.nn.Module]:
        """Under --fsdp, each of these is sharded on its own, then the root: the task's `fsdp_units(model)`
        (typically its transformer blocks, one all-gather each), else the root alone."""
        if not self.task.has("fsdp_units"):
            return []
        units = self.task.call("fsdp_units", self.model)
        if not isinstance(units, (list, tuple)) or not all(isinstance(u, torch.nn.Module) for u in units):
            raise TaskError(f"--task {self.task.spec}: fsdp_units() must return a list of the model's modules")
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
        loader = make_loader(KeyedSamples(self.held_out, self.cfg.seed), keys, workers=self.cfg.num_workers,
                             pin=self.pin, collate=self.collate)
        for batch, chunk in zip(loader, keys, strict=True):
            yield batch, len(chunk)

    def eval_metrics(self, model: torch.nn.Module, batch: Any) -> dict[str, Any]:
        found = {"loss": self.task.module.loss(model, batch)}
        if self.metric_names:
            found.update(self.task.module.metrics(model, batch))
        return found

    def sample(self, length: int, seed: int) -> str | None:
        return None

    def close(self) -> None:
        self.loader.close()
