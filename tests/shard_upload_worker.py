"""Run by test_distributed.py under torchrun (2 ranks): shards uploaded by the rank that wrote them.

Each rank writes into a staging directory of its own, as two nodes with disks of their own at the
same path would (rank 1's is under `own_disk_1/`). The mirror is a bucket on the local filesystem.
Save 1: rank 1's upload fails (a mirror outage), so rank 0 collects that save's shards instead.
Save 2: rank 1 uploads its shard file, and rank 0's checkpoint lists it as on the mirror.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from train_improved.checkpoint import CheckpointManager, CheckpointOptions, Kind
from train_improved.checkpoint.remote import RemoteStore
from train_improved.checkpoint.sharded import ShardWriter


def main(directory: Path, bucket: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    remote = RemoteStore.open(bucket, check_writable=rank == 0)
    step_now = [0]

    def upload(path: Path, digest: str) -> None:
        if step_now[0] == 1:
            raise OSError(5, "Input/output error", "the mirror")  # an outage, on rank 1's node only
        remote.upload_shard(path, digest)

    writer = ShardWriter(upload=upload)
    manager = CheckpointManager(directory, CheckpointOptions(mirror=bucket)) if rank == 0 else None
    for step in (1, 2):
        step_now[0] = step
        staging = [manager.staging_directory() if manager is not None else None]
        dist.broadcast_object_list(staging)
        mine = staging[0] if rank == 0 else directory.parent / "own_disk_1" / staging[0].name
        tensors = {"model": {f"rank{rank}.w": torch.full((256,), float(step + rank))}}
        pending = writer.start(mine, tensors)
        if manager is not None:
            manager.save({"step": step, "sharded": True}, step=step, kinds=Kind.ROLLING, shards=pending)
            for result in manager.wait_until_finished():
                print(f"step {step}: {result.error or 'committed'}", flush=True)
        writer.wait()
        dist.barrier()
    if manager is not None:
        manager.close()
    writer.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
