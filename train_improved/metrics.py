"""Run records: JSON lines (full-precision floats, one line per event) and optional TensorBoard.

Python's json writes floats with repr(), the shortest string that round-trips exactly, so two runs
can be compared bitwise from their metrics files. A run killed with SIGKILL may leave its last line
cut short; readers should skip a line that does not parse.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class MetricsLogger:
    def __init__(self, path: Path, *, tensorboard_dir: Path | None = None, enabled: bool = True) -> None:
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")  # appended: a resumed run continues the same file
        if self._file.tell() > 0 and not _ends_with_newline(path):
            self._file.write("\n")  # a kill -9 cut the last line: keep it apart from ours
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # only when asked: it imports tensorboard

            self._tb = SummaryWriter(log_dir=str(tensorboard_dir))

    def log(self, event: str, **fields: Any) -> None:
        if self._file is None:
            return
        record = {"event": event, **fields, "time": time.time()}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a killed run keeps every line it logged
        if self._tb is not None and "step" in fields:
            for key, value in fields.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    tag = f"checkpoint/{fields.get('kind', '')}/{key}" if event == "checkpoint" else f"{event}/{key}"
                    self._tb.add_scalar(tag, value, fields["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1) == b"\n"
