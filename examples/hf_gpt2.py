"""A Hugging Face `transformers` GPT-2, built from a config (no weights downloaded), on the built-in corpus.

    train --task examples/hf_gpt2.py
    train --task examples/hf_gpt2.py --layers 4 --width 128 --max-steps 2000

The model is the ecosystem's as it is: `GPT2LMHeadModel` computes its own shifted loss from `labels`.
The data is train's built-in corpus (the Python standard library's sources, bytes), cut into windows.
"""

from dataclasses import dataclass

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from train_improved.data import load_dataset


@dataclass
class Options:
    layers: int = 2
    heads: int = 2
    width: int = 64  # n_embd
    context: int = 64  # tokens per window


DEFAULTS = {"max_steps": 300, "batch_size": 16, "lr": 1e-3, "warmup_steps": 30, "eval_interval": 100,
            "eval_steps": 8}


class Windows(torch.utils.data.Dataset):
    """Non-overlapping windows of `context` tokens over 1-D token arrays (one per shard)."""

    def __init__(self, shards: list[np.ndarray], context: int) -> None:
        self.shards, self.context = shards, context
        self.tokens_per_sample = context  # the runner then reports tokens/s
        self.first = np.cumsum([0] + [len(s) // context for s in shards])

    def __len__(self) -> int:
        return int(self.first[-1])

    def __getitem__(self, i: int) -> torch.Tensor:
        shard = int(np.searchsorted(self.first, i, side="right")) - 1
        start = (i - int(self.first[shard])) * self.context
        return torch.from_numpy(np.asarray(self.shards[shard][start:start + self.context], dtype=np.int64))


def datasets(options: Options):
    corpus = load_dataset(None)  # built once into the cache from this Python's own sources
    return Windows(corpus.train, options.context), Windows(corpus.val, options.context)


def model(options: Options) -> torch.nn.Module:
    config = GPT2Config(vocab_size=256, n_positions=options.context, n_embd=options.width, n_layer=options.layers,
                        n_head=options.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, labels=batch).loss


def fsdp_units(model: GPT2LMHeadModel) -> list[torch.nn.Module]:
    return list(model.transformer.h)  # with --fsdp: one all-gather per transformer block
