"""Sharded state (FSDP2) through torch.distributed.checkpoint (DCP), under the store's rules.

    shards = write_shards(staging_dir, {"model": msd, "optimizer_state": osd["state"]})  # every rank
    manager.save(rest_of_state, step=..., shards=shards)                                  # rank 0
    ...
    read_shards(checkpoint_dir_path, template)                                            # every rank

Every rank writes its own shard file with DCP (which fsyncs each file and writes `.metadata`
last); then the ranks hash the files between them, so the store can record a digest of every
file and commit the checkpoint directory only after all of them are durable. Tensors only: a
DCP "bytes" entry is a pickle that DCP loads with `weights_only=False`, so such entries are never
written and are refused on load.

DCP's `.metadata` is itself a pickle that DCP loads with plain `pickle.load`. Here it is read
by an unpickler that resolves only DCP's own metadata classes, torch dtypes and sizes, so a
hostile `.metadata` is refused before anything in it runs (SPEC §5, secure loading).
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta

from .fileformat import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError, hash_file
from .storage import Shards, temp_path_for

METADATA_FILE = ".metadata"
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_SAFE_GLOBALS = {
    *((_DCP_METADATA, name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = (module, name) in _SAFE_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        if not allowed:
            raise UnsafeCheckpointError(f"{METADATA_FILE} needs {module}.{name} to unpickle and was refused "
                                        "(only DCP's own metadata classes are allowed)")
        return super().find_class(module, name)


def read_metadata(directory: Path) -> Metadata:
    """DCP's metadata of a sharded checkpoint, unpickled with an allow-list. Raises CheckpointError."""
    try:
        with open(directory / METADATA_FILE, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{METADATA_FILE} is missing (an incomplete sharded checkpoint)") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise CorruptCheckpointError(f"{METADATA_FILE} cannot be read: {e}") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{METADATA_FILE} holds a {type(metadata).__name__}, not DCP metadata")
    pickled = sorted(k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))
    if pickled:
        raise UnsafeCheckpointError(f"holds pickled objects ({', '.join(pickled[:3])}) that DCP would load with "
                                    "weights_only=False; refused")
    return metadata


class _SafeReader(FileSystemReader):
    """DCP's file reader, with the allow-listed metadata unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


@contextmanager
def _quiet_single_process() -> Iterator[None]:
    # DCP warns that it "assumes the intent is to save in a single process": here that is the intent.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def staging_directory(checkpoint_dir: Path) -> Path:
    """A fresh temporary name in `checkpoint_dir` for `write_shards` (removed at the next open if left)."""
    return temp_path_for(checkpoint_dir / "shards")


def write_shards(directory: Path, state: dict[str, Any]) -> Shards:
    """Write `state` (tensors and DTensors only) with DCP into `directory`; every rank calls this.

    Returns every file written, with its size and xxh3-128 digest, on every rank. The files are
    fsynced; `directory` is a staging area that the store links into the final checkpoint.
    """
    rank, world = _rank_and_world()
    with _quiet_single_process():
        dcp.save(state, storage_writer=FileSystemWriter(directory, single_file_per_rank=True, sync_files=True),
                 no_dist=world == 1)
    names = sorted(p.name for p in directory.iterdir() if p.is_file())
    # Each rank reads back a share of the files: the digests are taken from what is on disk.
    mine = {name: {"bytes": (directory / name).stat().st_size, "digest": hash_file(directory / name)}
            for i, name in enumerate(names) if i % world == rank}
    if world == 1:
        return Shards(directory, mine)
    everyone: list[dict[str, Any]] = [{} for _ in range(world)]
    dist.all_gather_object(everyone, mine)
    return Shards(directory, {k: v for part in everyone for k, v in part.items()})


def read_shards(directory: Path, state: dict[str, Any]) -> None:
    """Load the sharded checkpoint at `directory` into `state` in place; every rank calls this.

    `state` gives the keys, shapes and shardings wanted (the current model's and optimizer's
    sharded state dicts). A checkpoint that does not fit raises CheckpointError.
    """
    read_metadata(directory)  # refuse a hostile or damaged .metadata before DCP touches it
    try:
        with _quiet_single_process():
            dcp.load(state, storage_reader=_SafeReader(directory), no_dist=_rank_and_world()[1] == 1)
    except CheckpointException as e:  # a BaseException in DCP: catch it by name
        first = next(iter(e.failures.values()), e)
        raise CheckpointError(f"the sharded checkpoint {directory.name} does not fit this model and "
                              f"optimizer: {str(first).splitlines()[0][:200]}") from None


def load_model_state(directory: Path) -> dict[str, torch.Tensor]:
    """The full (unsharded) model weights of a sharded checkpoint, in one process, without torchrun.

    For inference or for converting to a single file: `torch.save(load_model_state(p), "model.pt")`.
    The caller verifies the checkpoint first (`verify_file`).
    """
    metadata = read_metadata(directory)
    wanted = {key: torch.empty(tuple(m.size), dtype=m.properties.dtype)
              for key, m in metadata.state_dict_metadata.items() if key.startswith("model.")}
    with _quiet_single_process():
        dcp.load(wanted, storage_reader=_SafeReader(directory), no_dist=True)
    return {key.removeprefix("model."): t for key, t in wanted.items()}
