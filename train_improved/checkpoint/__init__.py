"""The checkpoint store: public API (documented in CHECKPOINTING.md).

    from train_improved.checkpoint import CheckpointManager, CheckpointOptions, Kind
"""

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

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointOptions",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "Family",
    "Kind",
    "NoCheckpointError",
    "SaveResult",
    "UnsafeCheckpointError",
    "describe",
    "load_checkpoint",
    "read_footer",
    "verify_file",
]
