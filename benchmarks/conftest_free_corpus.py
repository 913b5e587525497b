"""A small real-text corpus for the benchmarks (the standard library's own sources)."""

from __future__ import annotations

import sysconfig
from pathlib import Path


def write_corpus(path: Path, size: int = 2_000_000) -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = bytearray()
    for p in sorted(stdlib.glob("*.py")):
        out += p.read_bytes()
        if len(out) >= size:
            break
    path.write_bytes(bytes(out[:size]))
