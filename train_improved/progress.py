"""Terminal output of a run: a rich progress bar on a terminal, timestamped lines in a batch log.

Outside a terminal (a SLURM or Kubernetes log) a progress line is printed every `--log-interval`
seconds (step, loss, lr, tokens/s, ETA), and log records carry a timestamp, so a week-long run's
log says what it was doing at any hour.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

err_console = Console(stderr=True)


def configure_logging(verbose: bool = False) -> None:
    if err_console.is_terminal:
        handler: logging.Handler = RichHandler(console=err_console, show_path=False, show_time=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:  # a log file: one line per record, never wrapped at 80 columns, with the time
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    # Our records at INFO; libraries (botocore, fsspec...) only when they warn.
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("train_improved").setLevel(logging.DEBUG if verbose else logging.INFO)


class RichProgress:
    """Step, loss, lr, tokens/s and ETA: a bar on a terminal, a timestamped line per interval otherwise."""

    def __init__(self, console: Console = err_console, log_interval: float = 60.0) -> None:
        self.console, self.unit = console, ""
        self.log_interval = log_interval
        self._bar: Progress | None = None
        self._task = None
        self._total = 0
        self._started = (0.0, 0)  # (time, step) when the run started, for the ETA
        self._next_line = 0.0

    def start(self, total: int, completed: int, unit: str) -> None:
        """`unit` of the rate: tok/s, samples/s."""
        self._total, self.unit = total, unit
        self._started = (time.monotonic(), completed)
        self._next_line = time.monotonic() + self.log_interval
        if self.console.is_terminal:
            self._bar = Progress(
                TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:,.0f} {task.fields[unit]}"
                           "{task.fields[mirror]}"),
                TimeRemainingColumn(), console=self.console,
            )
            self._task = self._bar.add_task("train", total=total, completed=completed, loss=float("nan"),
                                            lr=0.0, tps=0.0, unit=self.unit, mirror="")
            self._bar.start()

    def update(self, step: int, **fields: float) -> None:
        """loss, lr, rate (tokens or samples per second); and mirror_lag (steps the mirror is behind) when the run has a mirror."""
        mirror = f"  mirror {fields['mirror_lag']} steps behind" if "mirror_lag" in fields else ""
        if self._bar is not None:
            self._bar.update(self._task, completed=step, loss=fields["loss"], lr=fields["lr"],
                             tps=fields["rate"], mirror=mirror)
            return
        now = time.monotonic()
        if now >= self._next_line or step == self._total:
            self.console.print(f"{datetime.now():%Y-%m-%d %H:%M:%S} step {step}/{self._total}  "
                               f"loss {fields['loss']:.4f}  lr {fields['lr']:.2e}  "
                               f"{fields['rate']:,.0f} {self.unit}{mirror}  ETA {self._eta(now, step)}",
                               highlight=False, soft_wrap=True)
            self._next_line = now + self.log_interval

    def _eta(self, now: float, step: int) -> str:
        began, first = self._started
        done = step - first
        if done <= 0:
            return "-"
        left = (now - began) / done * (self._total - step)
        return str(timedelta(seconds=round(left)))

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
