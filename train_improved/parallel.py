"""How the model is spread over torchrun's ranks: replicated (DDP) or sharded (FSDP2), and its state.

    model = parallel.wrap(raw_model, dist, fsdp=cfg.fsdp, units=list(raw_model.blocks))
    model_state, optimizer_state = parallel.state_dicts(raw_model, optimizer, fsdp=cfg.fsdp)

With DDP every rank holds the whole model and the checkpoint holds the raw module's state_dict
(no "module." prefix). With FSDP2 each rank holds 1/N of every parameter and optimizer moment as
DTensors; their state dicts are keyed by parameter name and go to disk through
torch.distributed.checkpoint (see checkpoint/sharded.py).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import sharded
from .distributed import Dist


def wrap(raw_model: torch.nn.Module, d: Dist, *, fsdp: bool, units: list[torch.nn.Module]) -> torch.nn.Module:
    """The module the loop calls: `raw_model` itself (sharded in place under FSDP2, each of `units` its own
    all-gather, as torchtitan shards each block), or a DDP wrapper."""
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for unit in units:
            fully_shard(unit)
        fully_shard(raw_model)  # in place: parameters become DTensors, each rank holds 1/N
        return raw_model
    return DistributedDataParallel(raw_model) if d.enabled else raw_model


def gradient_sync(model: torch.nn.Module, raw_model: torch.nn.Module, d: Dist, *, fsdp: bool,
                  last: bool) -> AbstractContextManager[Any]:
    """Reduce gradients across ranks on the last micro-step of an accumulation only."""
    if fsdp:
        raw_model.set_requires_gradient_sync(last)  # type: ignore[operator] - added by fully_shard
        return nullcontext()
    return model.no_sync() if d.enabled and not last else nullcontext()  # type: ignore[operator]


def state_dicts(raw_model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, fsdp: bool
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Model and optimizer state dicts; under FSDP2, this rank's shards keyed by parameter name."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        return get_state_dict(raw_model, optimizer)
    return raw_model.state_dict(), optimizer.state_dict()


def load_sharded(raw_model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path,
                 param_groups: list[dict[str, Any]]) -> None:
    """FSDP2: every rank reads its shards of model and optimizer from a sharded checkpoint directory."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(raw_model, optimizer)  # the shapes and shardings wanted
    tensors = sharded.split_tensors(model_state, optimizer_state)
    sharded.read_shards(path, tensors)
    set_state_dict(raw_model, optimizer, model_state_dict=tensors["model"],
                   optim_state_dict={"state": tensors["optimizer_state"], "param_groups": param_groups})


def load_full_weights(raw_model: torch.nn.Module, weights: dict[str, torch.Tensor], *, fsdp: bool) -> None:
    """Full (unsharded) weights into the model, replicated or sharded (a resume, --init-from).

    Weights that do not fit the model raise CheckpointError with torch's first specific line.
    """
    from .checkpoint import CheckpointError

    try:
        if fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(raw_model, weights, options=StateDictOptions(full_state_dict=True))
        else:
            raw_model.load_state_dict(weights)
    except (RuntimeError, KeyError, ValueError) as e:
        lines = str(e).splitlines()
        raise CheckpointError("the checkpoint's model does not fit this model shape: "
                              f"{lines[1].strip() if len(lines) > 1 else lines[0] if lines else e}") from None
