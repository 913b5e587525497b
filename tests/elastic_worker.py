"""`train`, with every training window it reads recorded: the hook of test_elastic.py.

    python tests/elastic_worker.py RECORD_DIR --data ... --resume latest          # or under torchrun

Each rank appends one JSON line per micro-batch it asks its loader for to RECORD_DIR/rank<r>.jsonl: the
sampler's position (epoch, index: which step), the micro-batch number and its window indices. So
the elastic tests compare what the ranks read, not what the program prints.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from train_improved import samples
from train_improved.cli import main

record = Path(sys.argv.pop(1))
log = open(record / f"rank{os.environ.get('RANK', '0')}.jsonl", "a")  # noqa: SIM115 - open for the process's life
read_micro_batch = samples.StepLoader.micro_batch


def recorded(self: samples.StepLoader, k: int):  # noqa: ANN201
    order = self.order
    log.write(json.dumps({"epoch": order.epoch, "index": order.index, "k": k, "phase": order.view(order.epoch).phase,
                          "windows": [int(i) for i in order.micro_batch_indices(k, self.size)]}) + "\n")
    log.flush()
    return read_micro_batch(self, k)


samples.StepLoader.micro_batch = recorded
main()
