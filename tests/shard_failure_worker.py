"""Run by test_distributed.py under torchrun (2 ranks): rank 1's shard write fails, then a save succeeds.

Rank 1's shard file name is taken by a directory, so only its DCP write fails. Every rank must
learn of the failure (none may hang), rank 0's store must record a failed save and keep latest,
and the next save must commit normally.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from train_improved.checkpoint import CheckpointManager, Kind
from train_improved.checkpoint.sharded import ShardWriter


def main(directory: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    writer = ShardWriter()
    manager = CheckpointManager(directory) if rank == 0 else None
    for step in (1, 2):
        staging = [manager.staging_directory() if manager is not None else None]
        dist.broadcast_object_list(staging)
        if step == 1 and rank == 0:
            (staging[0] / "__1_0.distcp").mkdir(parents=True)  # rank 1 cannot create its shard file
        dist.barrier()
        tensors = {"model": {f"rank{rank}.w": torch.full((256,), float(step + rank))}}
        pending = writer.start(staging[0], tensors)
        if manager is not None:
            manager.save({"step": step, "sharded": True}, step=step, kinds=Kind.ROLLING, shards=pending)
            for result in manager.wait_until_finished():
                print(f"step {step}: {result.error or 'committed'}", flush=True)
        writer.wait()
        dist.barrier()
    if manager is not None:
        latest = manager.latest()
        print(f"latest step {latest.step if latest else None}", flush=True)
        manager.close()
    writer.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
