"""Terminal output of a run: a rich progress bar and rich logging on stderr."""

from __future__ import annotations

import logging

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

err_console = Console(stderr=True)


def configure_logging(verbose: bool = False) -> None:
    handler = RichHandler(console=err_console, show_path=False, show_time=False, markup=False)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[handler], force=True)


class RichProgress:
    """Step, loss, lr, tokens/s and ETA; in a non-interactive log, one line per 10% of the run."""

    def __init__(self, console: Console = err_console) -> None:
        self.console = console
        self._bar: Progress | None = None
        self._task = None
        self._total = 0
        self._next_line = 0

    def start(self, total: int, completed: int) -> None:
        self._total = total
        self._next_line = completed
        if self.console.is_terminal:
            self._bar = Progress(
                TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:,.0f} tok/s"),
                TimeRemainingColumn(), console=self.console,
            )
            self._task = self._bar.add_task("train", total=total, completed=completed, loss=float("nan"),
                                            lr=0.0, tps=0.0)
            self._bar.start()

    def update(self, step: int, **fields: float) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, loss=fields["loss"], lr=fields["lr"],
                             tps=fields["tokens_per_s"])
        elif step >= self._next_line or step == self._total:
            self.console.print(f"step {step}/{self._total}  loss {fields['loss']:.4f}  lr {fields['lr']:.2e}  "
                               f"{fields['tokens_per_s']:,.0f} tok/s", highlight=False)
            self._next_line = step + max(1, self._total // 10)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
