"""One writer per checkpoint directory: an exclusive flock on `.lock`, holding the writer's pid.

Two runs writing one directory would rotate each other's files away. flock is released by the
kernel when the process dies, however it dies (kill -9 included), so a stale lock never blocks
a restart, and a preempted job's successor can take the directory at once.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .fileformat import CheckpointError
from .layout import LOCK
from .storage import temp_path_for


class DirectoryLock:
    """Create `directory` if needed, check it is writable, and hold its lock until `release()`.

    Raises CheckpointError (one line, naming the holder's pid) if another process holds it.
    """

    def __init__(self, directory: Path) -> None:
        if directory.exists() and not directory.is_dir():
            raise CheckpointError(f"checkpoint directory {directory} is a file, not a directory")
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise CheckpointError(f"checkpoint directory {directory} is not writable: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise CheckpointError(
                f"checkpoint directory {directory} is in use by another train process (pid {holder}); "
                "use another --checkpoint-dir or stop that run first"
            ) from None
        self._fd: int | None = fd
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        # An existing .lock opens even where the directory takes no new files (its permissions changed).
        probe = temp_path_for(directory / "probe")
        try:
            probe.touch()
            probe.unlink()
        except OSError as e:
            self.release()
            raise CheckpointError(f"checkpoint directory {directory} is not writable: {e.strerror}") from None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
