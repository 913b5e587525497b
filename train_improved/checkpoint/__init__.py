"""The checkpoint store: public API (documented in CHECKPOINTING.md).

    from train_improved.checkpoint import CheckpointManager, CheckpointOptions, GracefulStop, Kind
    CheckpointOptions(mirror="s3://bucket/run1")   # a second tier: restore() falls back to it, saves go up to it
"""

from ..signals import GracefulStop
from .fileformat import (
    CheckpointError,
    CheckpointWriteError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    load_checkpoint,
    read_footer,
    verify_file,
)
from .layout import Family, Kind
from .manager import CheckpointManager
from .records import CheckpointInfo, CheckpointOptions, NoCheckpointError, SaveResult, describe
from .remote import MirrorError, MirrorFenced, RemoteStore
from .validation import RESERVED_META_KEYS

__all__ = [
    "RESERVED_META_KEYS",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointOptions",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "Family",
    "GracefulStop",
    "Kind",
    "MirrorError",
    "MirrorFenced",
    "NoCheckpointError",
    "RemoteStore",
    "SaveResult",
    "UnsafeCheckpointError",
    "describe",
    "load_checkpoint",
    "read_footer",
    "verify_file",
]
