"""Graceful stop on SIGINT, SIGTERM, SIGHUP and SIGUSR1: the handler only sets a flag.

The training loop polls `stop.requested` at every micro-step and during evaluation, then writes an
emergency checkpoint and exits with 128 + the signal number. SIGTERM is registered explicitly:
Python installs only a SIGINT handler, and as PID 1 in a container an unhandled SIGTERM is ignored.

A second SIGINT means "stop now": it exits at once with 130. Saves run in the writer thread and
the main thread waits for them in short slices, so this handler runs within ~0.1 s even during a
long write; the abandoned save's temporary file is removed when the next run opens the directory,
and every committed file is untouched. The other handlers are restored on exit; SIGINT's stays once
a stop was requested, so a Ctrl+C during shutdown also exits quietly with 130.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)


class GracefulStop:
    """Turns stop signals into a flag; restores the old handlers when uninstalled.

    As a context manager (`with GracefulStop() as stop:`), or in a flat script: `stop =
    GracefulStop().install()` before the loop, `stop.uninstall()` after it.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.signum: int | None = None
        self.at: float | None = None  # time.monotonic() when the first stop signal arrived: budgets count from it
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum, self.at = signum, time.monotonic()
            return
        if signum == signal.SIGINT:
            os.write(2, b"\nsecond interrupt: stopping now without the emergency checkpoint; "
                        b"every committed checkpoint is intact\n")
            os._exit(130)
        # Repeated SIGTERM/SIGHUP/SIGUSR1 while stopping: already on our way out.

    def install(self) -> GracefulStop:
        """Handle the stop signals from now on (only the main thread can; elsewhere this does nothing)."""
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        """Give the signals their previous handlers back (SIGINT's stays ours once a stop was requested)."""
        for s, handler in self._previous.items():
            if s == signal.SIGINT and self.signum is not None:
                continue  # stopping: until the process is gone, another Ctrl+C still means "now", not a traceback
            signal.signal(s, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def __enter__(self) -> GracefulStop:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()
