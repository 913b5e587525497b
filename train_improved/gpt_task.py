"""The built-in GPT, written as a task (task.py's contract) like any model given with `--task`.

    train                       # this task, with its options from train's own flags (--n-layer, --data, ...)

The runner treats it as it treats a user's task: it reads `datasets()` in its shuffled, resumable
order, computes `loss()`, shards `fsdp_units()` under --fsdp, and calls `sample()` at the end. What
is particular to text lives on the dataset (data.TokenWindows), through hooks any task may use:
`at_epoch` (each epoch shifts the window grid), `position` (shard and offset, for readers of a
checkpoint), `fingerprint` (other data under a resumed run), `tokens_per_sample` (tokens/s) and
`description` (the banner); `describe()` gives the banner's model line.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from .config import TrainConfig
from .data import Dataset, TokenWindows, load_dataset
from .model import GPT, GPTConfig, sample_text
from .task import Task


@dataclass
class Options:
    """Given by train's own flags, not as task options: the demo's command line stays what it was."""

    data: str | None
    vocab_size: int | None
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    dropout: float


_loaded: tuple[Options, Dataset] | None = None  # model() and datasets() of one run read the data once


def _tokens(options: Options) -> Dataset:
    global _loaded
    if _loaded is None or _loaded[0] is not options:
        _loaded = options, load_dataset(options.data, vocab_size=options.vocab_size)
    return _loaded[1]


def model(options: Options) -> GPT:
    o = options
    return GPT(GPTConfig(vocab_size=_tokens(o).vocab_size, block_size=o.block_size, n_layer=o.n_layer,
                         n_head=o.n_head, n_embd=o.n_embd, dropout=o.dropout))


def datasets(options: Options) -> tuple[TokenWindows, TokenWindows]:
    tokens = _tokens(options)
    return (TokenWindows(tokens.train, options.block_size, name="train", description=tokens.summary()),
            TokenWindows(tokens.val, options.block_size, name="validation"))


def loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    inputs, targets = batch
    return model(inputs, targets)[1]


def fsdp_units(model: GPT) -> list[torch.nn.Module]:
    return list(model.blocks)  # one all-gather per block, as in torchtitan


def sample(model: GPT, length: int, seed: int) -> str | None:
    """A text sample (byte-level data only), from a line start: any text has one."""
    if model.config.vocab_size != 256:
        return None
    return sample_text(model, b"\n", length, seed=seed)


def describe(model: GPT, options: Options) -> str:
    o = options
    return (f"{model.num_params() / 1e6:.2f}M parameters ({o.n_layer} layers x {o.n_embd}, {o.n_head} heads, "
            f"context {o.block_size})")


def builtin(cfg: TrainConfig) -> Task:
    """This module as the task `train` runs when no --task is given."""
    options = Options(**{f.name: getattr(cfg, f.name) for f in fields(Options)})
    return Task("gpt", sys.modules[__name__], Path(__file__), options, builtin=True)
