"""torchrun support: process group set-up and the few collectives the loop needs.

    torchrun --nproc_per_node 2 -m train_improved --max-steps 500

gloo on CPU, nccl on CUDA. Only rank 0 logs, shows progress and writes checkpoints. A stop
request seen by any rank is agreed on with one all-reduce per micro-step, so every rank abandons
the same step and the emergency checkpoint is consistent. Nothing in a checkpoint belongs to one
rank (data positions are global, dropout seeds a function of the step and micro-batch), so a
run may resume on another number of ranks.
"""

from __future__ import annotations

import gc
import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    torchrun: bool = False  # started by torchrun, even with one process (--fsdp needs a process group)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or self.torchrun

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environment() -> Dist:
    """Read torchrun's variables; a plain `train` is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")),
                torchrun="TORCHELASTIC_RUN_ID" in os.environ)


def init(d: Dist, device: str) -> None:
    if d.enabled and not dist.is_initialized():
        if d.is_main and restarts_can_meet_stale_addresses():
            logging.getLogger("train_improved").warning(
                "torchrun --max-restarts: also set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun. In the store "
                "its rendezvous shares with the workers (torch's default), a restarted group can read the failed "
                "group's addresses and fail to connect, using up the restarts (pytorch/pytorch#135712)")
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")


def restarts_can_meet_stale_addresses() -> bool:
    """torchrun restarts workers (--max-restarts) and shares its rendezvous TCPStore with them: a new group
    can then read the previous group's process-group keys (its dead peers' addresses) from that store."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and \
        int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0


def shutdown(d: Dist, *, together: bool) -> None:
    """Destroy the process group.

    `together` (after a normal end, the emergency stop included): free what still holds the group
    (DDP's reducer) while the interpreter is fully alive, then meet every rank at a barrier so none
    tears gloo down while another still communicates. Without this, a finished run could end with
    "terminate called without an active exception" (SIGABRT) on one rank and torchrun exiting 1;
    see pytorch/pytorch#179291. Never after an error: the other ranks may be stuck in another
    collective, and a barrier would turn the crash into a hang.
    """
    if not (d.enabled and dist.is_initialized()):
        return
    if together:
        gc.collect()
        dist.barrier()
    dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def any_rank(d: Dist, flag: bool, device: str) -> bool:
    """True on every rank if `flag` is true on any rank (a stop request, say)."""
    if not d.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean(d: Dist, value: torch.Tensor) -> float:
    """The mean of a 0-d tensor over ranks (the loss every rank saw), on every rank: one host sync."""
    return total(d, value) / d.world_size


def total(d: Dist, value: torch.Tensor) -> float:
    """The sum of a 0-d tensor over ranks, on every rank, as a float: one host sync."""
    if not d.enabled:
        return value.item()
    t = value.detach().to(torch.float64).reshape(1)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item()


def totals(d: Dist, values: torch.Tensor) -> list[float]:
    """The element-wise sums of a 1-d tensor over ranks, on every rank, as floats: one host sync."""
    t = values.detach().to(torch.float64)
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def gather(d: Dist, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (plain data and CPU tensors)."""
    if not d.enabled:
        return [obj]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


_BROADCAST_CHUNK = 64 << 20


def broadcast_file(d: Dist, path: Path | None, into: BinaryIO | None) -> None:
    """Rank 0's file `path`, sent over the process group (a collective); a rank that gives `into` writes it there.

    For a checkpoint some ranks cannot read from their own disk (nodes without a shared one). In
    chunks, each written as it arrives: no rank holds more than one chunk of a large file.
    """
    device = torch.device("cuda", d.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    size = torch.tensor([path.stat().st_size if d.is_main and path is not None else 0], dtype=torch.int64,
                        device=device)
    dist.broadcast(size, src=0)
    total = int(size.item())
    with open(path, "rb") if d.is_main and path is not None else nullcontext() as f:
        for start in range(0, total, _BROADCAST_CHUNK):
            n = min(_BROADCAST_CHUNK, total - start)
            chunk = torch.frombuffer(bytearray(f.read(n)), dtype=torch.uint8).to(device) if d.is_main else \
                torch.empty(n, dtype=torch.uint8, device=device)
            dist.broadcast(chunk, src=0)
            if into is not None:
                into.write(chunk.cpu().numpy().tobytes())
