"""Sharded state (FSDP2) through torch.distributed.checkpoint (DCP), under the store's rules.

    writer = ShardWriter()                                                          # every rank, once
    shards = writer.start(manager.staging_directory(), split_tensors(msd, osd))  # every rank (rank 0 names it)
    manager.save(rest_of_state, step=..., shards=shards)                                # rank 0
    ...
    read_shards(checkpoint_dir_path, template)                                          # every rank

Every rank writes its own shard file with DCP (which fsyncs each file and writes `.metadata`
last), in the background after a copy to host memory (`write_shards` does the same while the
caller waits); then the ranks hash the files between them, so the store can record a digest of
every file and commit the checkpoint directory only after all of them are durable. On nodes
that do not share the directory, either the other nodes first send their shard files to rank 0
over the process group and delete them (`ShardWriter(collect=True)`), so rank 0's store holds
every checkpoint whole; or, with a mirror, each node uploads its own and deletes them
(`ShardWriter(upload=...)`), and rank 0's checkpoint lists them as on the mirror. Tensors only: a
DCP "bytes" entry is a pickle that DCP loads with `weights_only=False`, so such entries are never
written and are refused on load.

DCP's `.metadata` is itself a pickle that DCP loads with plain `pickle.load`. Here it is read
by an unpickler that resolves only DCP's own metadata classes, torch dtypes and sizes, so a
hostile `.metadata` is refused before anything in it runs (SPEC §5, secure loading).
"""

from __future__ import annotations

import logging
import os
import pickle
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta

from .fileformat import (
    CheckpointError,
    CheckpointWriteError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    describe_os_error,
    hash_file,
)
from .records import tensor_bytes
from .storage import PendingShards, Shards, fsync, fsync_dir

logger = logging.getLogger("train_improved.checkpoint")
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


def split_tensors(model_state: dict[str, Any], optimizer_state: dict[str, Any]) -> dict[str, Any]:
    """What a sharded checkpoint keeps in DCP: the model and the optimizer's per-parameter state.

    Takes `optimizer_state["state"]` out; the rest of the optimizer state (hyperparameters, param
    groups) stays for `state.pt`. `load_model_state` reads the "model" part back.
    """
    return {"model": model_state, "optimizer_state": optimizer_state.pop("state")}


def _writer(directory: Path) -> FileSystemWriter:
    return FileSystemWriter(directory, single_file_per_rank=True, sync_files=True)


def write_shards(directory: Path, state: dict[str, Any]) -> Shards:
    """Write `state` (tensors and DTensors only) with DCP into `directory`; every rank calls this.

    Returns every file written, with its size and xxh3-128 digest, on every rank. The files are
    fsynced; `directory` is a staging area that the store links into the final checkpoint.
    The loop waits for all of it; `ShardWriter` does the same in the background.
    """
    world = _rank_and_world()[1]
    error = None
    try:
        with _quiet_single_process():
            dcp.save(state, storage_writer=_writer(directory), no_dist=world == 1)
    except CheckpointException as e:  # a BaseException in DCP: catch it by name
        error = f"writing the shards failed: {_first_failure(e)}"
    return _digests(directory, None, error)


def _first_failure(e: CheckpointException) -> str:
    """One line for the first rank's failure (DCP keeps (exception, traceback) per failed rank)."""
    failure = next(iter(e.failures.values()), e)
    cause = failure[0] if isinstance(failure, tuple) else failure
    text = describe_os_error(cause) if isinstance(cause, OSError) else f"{type(cause).__name__}: {cause}"
    return text.splitlines()[0][:200] if text else type(cause).__name__


_CHUNK = 64 << 20  # bytes per message when a shard file is sent to rank 0


def _files_rank_0_lacks(directory: Path, group: dist.ProcessGroup | None) -> list[tuple[str, int, int]]:
    """(name, bytes, holder) of each file in the ranks' `directory` that rank 0 does not see; a collective.

    `holder` is the lowest rank that sees it: on nodes with disks of their own, the one that sends it.
    """
    world = _rank_and_world()[1]
    mine = sorted((p.name, p.stat().st_size) for p in directory.iterdir() if p.is_file()) \
        if directory.is_dir() else []
    listings: list[list[tuple[str, int]]] = [[] for _ in range(world)]
    dist.all_gather_object(listings, mine, group=group)
    held, lacking = {name for name, _ in listings[0]}, []
    for holder in range(1, world):
        for name, size in listings[holder]:
            if name not in held:
                held.add(name)
                lacking.append((name, size, holder))
    return lacking


def collect_on_rank_0(directory: Path, group: dist.ProcessGroup | None) -> None:
    """Send every file of `directory` that rank 0 does not hold to rank 0, then delete it here; a collective.

    For nodes with disks of their own at the same path: each node holds only its ranks' shard files.
    Each missing file is sent by the lowest rank that holds it, in chunks (no rank holds a whole
    shard in memory); rank 0 writes it aside, fsyncs it and links it into its `directory`. A sender
    deletes its copy only once rank 0 has stored it as a new file, so no node but rank 0's keeps
    anything, and a directory that was shared after all (a late listing on a network filesystem:
    the link finds the name taken) loses nothing.
    """
    rank, world = _rank_and_world()
    plan = _files_rank_0_lacks(directory, group)
    stored = []  # on rank 0: the names it linked in as new files
    for name, size, sender in plan:
        if rank == sender:
            with open(directory / name, "rb") as f:
                for start in range(0, size, _CHUNK):
                    dist.send(torch.frombuffer(bytearray(f.read(min(_CHUNK, size - start))), dtype=torch.uint8),
                              dst=0, group=group)
        elif rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
            aside = directory / f".received-{name}"
            with open(aside, "wb") as f:
                for start in range(0, size, _CHUNK):
                    chunk = torch.empty(min(_CHUNK, size - start), dtype=torch.uint8)
                    dist.recv(chunk, src=sender, group=group)
                    f.write(chunk.numpy().tobytes())
                f.flush()
                fsync(f.fileno())
            try:
                os.link(aside, directory / name)  # never over an existing file: the server decides, not a cache
                stored.append(name)
            except FileExistsError:
                pass
            aside.unlink()
    if rank == 0 and plan:
        fsync_dir(directory)
    if plan:
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, stored, group=group)
        for name, _, sender in plan:
            if rank == sender and name in everyone[0]:
                (directory / name).unlink()
    if rank != 0:
        try:
            directory.rmdir()  # empty once this node's files are sent (another rank of the node may remove it)
        except OSError:
            pass


def upload_from_their_nodes(directory: Path, group: dist.ProcessGroup | None, upload: Callable[[Path, str], None],
                            *, skip: bool = False) -> tuple[dict[str, Any], str | None]:
    """Upload every file of `directory` that rank 0 does not hold, from the node that holds it; a collective.

    For nodes with disks of their own and a mirror: each file rank 0's node lacks is hashed and
    uploaded (verified, `RemoteStore.upload_shard`) by the lowest rank that holds it. Returns this
    rank's entries for those files (marked `on_mirror`) and its upload error, if any. Every rank
    takes part, also with `skip` (its own write failed: it uploads nothing).
    """
    rank = _rank_and_world()[0]
    entries: dict[str, Any] = {}
    for name, size, owner in _files_rank_0_lacks(directory, group):
        if owner != rank or skip:
            continue
        path = directory / name
        try:
            digest = hash_file(path)
            upload(path, digest)
        except Exception as e:  # noqa: BLE001 - any failure of the mirror's client: reported, and the save collected
            return {}, f"uploading shard file {name} to the mirror failed: {type(e).__name__}: {e}"
        entries[name] = {"bytes": size, "digest": digest, "on_mirror": True}
    return entries, None


def _digests(directory: Path, group: dist.ProcessGroup | None, error: str | None, *, rank_0_alone: bool = False,
             known: dict[str, Any] | None = None) -> Shards:
    """Size and digest of every file in `directory`, on every rank (a collective on `group`).

    Each rank reads back a share of the files (rank 0 all of them with `rank_0_alone`: the files
    collected on its disk): the digests are taken from what is on disk. Every rank takes part even
    after a failure of its own (otherwise the others would wait forever), and every rank raises
    CheckpointWriteError if any rank failed. `known`: this rank's entries already taken (files it uploaded).
    """
    rank, world = _rank_and_world()
    hashers = 1 if rank_0_alone else world  # rank r < hashers reads every hashers-th file from the r-th on
    mine: dict[str, Any] = dict(known or {})
    if error is None and rank < hashers:
        try:
            names = sorted(p.name for p in directory.iterdir() if p.is_file())
            mine.update({name: {"bytes": (directory / name).stat().st_size, "digest": hash_file(directory / name)}
                         for i, name in enumerate(names) if i % hashers == rank})
        except OSError as e:
            error = f"reading back the shards failed: {describe_os_error(e)}"
    everyone: list[tuple[dict[str, Any], str | None]] = [(mine, error)]
    if world > 1:
        everyone = [({}, None) for _ in range(world)]
        dist.all_gather_object(everyone, (mine, error), group=group)
    by_error: dict[str, list[str]] = {}  # DCP reports one rank's failure on every rank: say it once
    for r, (_, err) in enumerate(everyone):
        if err:
            by_error.setdefault(err, []).append(str(r))
    if by_error:
        raise CheckpointWriteError("; ".join(f"rank{'s' if len(ranks) > 1 else ''} {', '.join(ranks)}: {err}"
                                             for err, ranks in by_error.items()))
    return Shards(directory, {k: v for part, _ in everyone for k, v in part.items()})


class ShardWriter:
    """Writes this rank's shards in the background, so the loop waits only for a copy to host memory.

    Every rank holds one and calls `start` at the same save points (a collective). DCP's
    `async_save` copies the shards into host buffers that are kept and reused from save to save,
    then writes them from a thread; the ranks then exchange digests, as `write_shards` does. Both
    run on a process group of their own (gloo), so they never interleave with the training loop's
    collectives. At most one write is in flight: `start` first waits for the previous one.
    For nodes that do not share the directory, every write ends with the other nodes' files either
    sent to rank 0 (`collect`: `collect_on_rank_0`) or, with a mirror, uploaded by their own nodes
    (`upload`: `upload_from_their_nodes`; rank 0's store then lists them as on the mirror).
    """

    def __init__(self, *, collect: bool = False, upload: Callable[[Path, str], None] | None = None) -> None:
        self.collect, self.upload = collect, upload
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        world = _rank_and_world()[1]
        self._group = dist.new_group(backend="gloo") if world > 1 else None  # collective: every rank, same order
        cuda = torch.cuda.is_available()
        self._stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                    use_async_staging=False, use_non_blocking_copy=cuda))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-digests")
        self._pending: PendingShards | None = None

    def start(self, directory: Path, state: dict[str, Any]) -> PendingShards:
        """Copy `state`'s tensors to host memory and start writing them into `directory`."""
        self.wait()
        with _quiet_single_process():
            upload = dcp.async_save(state, storage_writer=_writer(directory), process_group=self._group,
                                    async_stager=self._stager, no_dist=_rank_and_world()[1] == 1)
        # DTensors count their whole size: what all ranks write together.
        finished = self._executor.submit(self._finish, directory, upload)
        self._pending = PendingShards(directory, tensor_bytes(state), finished)
        return self._pending

    def _finish(self, directory: Path, upload: Future) -> Shards:
        error = None
        try:
            upload.result()
        except CheckpointException as e:
            error = f"writing the shards failed: {_first_failure(e)}"
        except Exception as e:  # noqa: BLE001 - a failed save, reported to every rank below and by the store
            error = f"writing the shards failed: {type(e).__name__}: {e}"
        if self.upload is not None:
            uploaded, upload_error = upload_from_their_nodes(directory, self._group, self.upload,
                                                             skip=error is not None)
            failed: list[str | None] = [None] * _rank_and_world()[1]
            dist.all_gather_object(failed, upload_error, group=self._group)
            if not any(failed):
                shards = _digests(directory, self._group, error, rank_0_alone=True, known=uploaded)
                for name in uploaded:  # on the mirror, verified, and in the footer rank 0 is about to commit
                    (directory / name).unlink()
                if _rank_and_world()[0] != 0 and uploaded:
                    try:
                        directory.rmdir()  # empty now (another rank of the node may remove it)
                    except OSError:
                        pass
                return shards
            # The mirror failed a node (an outage): this save's shards go to rank 0's disk instead, as
            # without a mirror, so the local store keeps checkpointing; the mirror catches up later.
            logger.warning("%s; rank 0 collects this save's shards instead", next(e for e in failed if e))
        if self.collect or self.upload is not None:
            # Every rank takes part even after its own failure: the others would wait forever.
            try:
                collect_on_rank_0(directory, self._group)
            except (OSError, RuntimeError) as e:
                error = error or f"sending the shards to rank 0 failed: {type(e).__name__}: {e}"
        return _digests(directory, self._group, error, rank_0_alone=self.collect or self.upload is not None)

    def wait(self) -> None:
        """Block until the write in flight has finished on every rank (its failure is the store's to report)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending.wait()
            except CheckpointWriteError:
                pass  # rank 0's store records it as a failed save; every rank got the same error

    def close(self) -> None:
        self.wait()
        self._executor.shutdown(wait=True)
        self._stager.close()


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
        raise CheckpointError(f"the sharded checkpoint {directory.name} does not fit this model and "
                              f"optimizer: {_first_failure(e)}") from None


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
