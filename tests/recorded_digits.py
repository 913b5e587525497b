"""examples/digits.py with every training sample it reads recorded: the task of the elastic task test.

Each process appends one line per sample it reads, `index sum-of-pixels` (the sum shows the random
shift too), to $RECORD_DIR/rank<r>-<pid>.txt. The first two lines of a file are the runner's start-up
check of the task; then come the steps, in order, B / world size samples per step on each rank.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import digits  # noqa: E402
from digits import DEFAULTS, Options, loss, metrics, model  # noqa: E402, F401


class Recorded(torch.utils.data.Dataset):
    def __init__(self, inner: torch.utils.data.Dataset) -> None:
        self.inner, self.log = inner, None

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        image, label = self.inner[i]
        if self.log is None:
            name = f"rank{os.environ.get('RANK', '0')}-{os.getpid()}.txt"
            self.log = open(Path(os.environ["RECORD_DIR"]) / name, "a")  # noqa: SIM115 - for the process's life
        self.log.write(f"{i} {image.sum().item():.6f}\n")
        self.log.flush()
        return image, label


def datasets(options: Options):
    train, held_out = digits.datasets(options)
    return Recorded(train), held_out
