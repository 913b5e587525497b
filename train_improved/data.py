"""Token data: the built-in corpus, user text, pre-tokenized shards, and a resumable loader.

`--data` may be
  * nothing: the built-in corpus, made at first use from this Python's standard library sources
    (real text on every machine, nothing downloaded), byte-level, prepared once into token shards
    under the cache directory; files are ordered by a fixed hash of their relative path, and about
    5% of them, chosen by another such hash, form the fixed held-out split;
  * a UTF-8 text file, or a directory of .txt files (sorted), byte-level; the last 10% is held out;
  * a directory of token shards, *.npy or nanoGPT-style *.bin (raw uint16), split into train and
    val by file name.
Training reads windows of `block_size + 1` tokens in a shuffled order per epoch (`ShuffledSampler`, a
`samples.SampleOrder`): independent windows in every batch, as nanoGPT samples them, with a position
(epoch, index) that checkpoints store, so a resume continues with exactly the next batch on any
number of ranks.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import sysconfig
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import DataError
from .samples import SampleOrder

CORPUS_VERSION = 2  # bump when the built-in corpus's construction changes
SHARD_TOKENS = 8 * 1024 * 1024  # built-in corpus shard size (tokens = bytes)
TEXT_VAL_FRACTION = 0.1


@dataclass
class Dataset:
    train: list[np.ndarray]  # 1-D token arrays (often memory-mapped)
    val: list[np.ndarray]
    vocab_size: int
    description: str

    @property
    def train_tokens(self) -> int:
        return sum(len(s) for s in self.train)

    def summary(self) -> str:
        """One line for the start-up banner: what was loaded and how it is split."""
        val = sum(len(s) for s in self.val)
        return (f"{self.description}: {self.train_tokens:,} training tokens in {len(self.train)} shard(s), "
                f"{val:,} held out; vocabulary {self.vocab_size}")


def default_cache_dir() -> Path:
    env = os.environ.get("TRAIN_IMPROVED_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "train_improved"


def load_dataset(spec: str | None, *, vocab_size: int | None = None, cache_dir: Path | None = None) -> Dataset:
    if spec is None:
        return _load_shard_dir(build_stdlib_corpus(cache_dir or default_cache_dir()), vocab_size or 256,
                               "built-in corpus (Python standard library sources, bytes)")
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"--data {spec}: no such file or directory")
    if path.is_file():
        return _split_text(_read_bytes(path), vocab_size, f"text file {path}")
    shards = sorted(p for p in path.iterdir() if p.suffix in (".npy", ".bin"))
    if shards:
        return _load_shard_dir(path, vocab_size, f"token shards in {path}")
    texts = sorted(path.glob("*.txt"))
    if not texts:
        raise DataError(f"--data {spec}: directory holds no .txt, .npy or .bin files")
    # Only the directory's own .txt files are read: say what was left out, so nothing is ignored silently.
    others = [p for p in path.iterdir() if p.suffix != ".txt" and not p.name.startswith(".")]
    dirs = sum(p.is_dir() for p in others)
    ignored = [f"{n} {what}" for n, what in ((dirs, "subdirectories"), (len(others) - dirs, "other files")) if n]
    note = f" (ignored: {', '.join(ignored)})" if ignored else ""
    return _split_text(b"".join(_read_bytes(p) for p in texts), vocab_size, f"{len(texts)} .txt files in {path}{note}")


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None


def _split_text(data: bytes, vocab_size: int | None, description: str) -> Dataset:
    if vocab_size is not None and vocab_size < 256:
        raise DataError(f"text is byte-level and needs --vocab-size of at least 256 (got {vocab_size})")
    tokens = np.frombuffer(data, dtype=np.uint8)
    cut = int(len(tokens) * (1 - TEXT_VAL_FRACTION))
    return Dataset([tokens[:cut]], [tokens[cut:]], vocab_size or 256, description)


def _open_shard(path: Path) -> np.ndarray:
    try:
        if path.suffix == ".bin":
            return np.memmap(path, dtype=np.uint16, mode="r")
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read token shard {path}: {e}") from None
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"token shard {path} must be a 1-D array of integers (got {arr.dtype}, shape {arr.shape})")
    return arr


def _load_shard_dir(directory: Path, vocab_size: int | None, description: str) -> Dataset:
    shards = sorted(p for p in directory.iterdir() if p.suffix in (".npy", ".bin"))
    train = [_open_shard(p) for p in shards if "train" in p.name]
    val = [_open_shard(p) for p in shards if "val" in p.name]
    if not train or not val:
        raise DataError(f"{directory}: token shards need 'train' and 'val' in their file names "
                        f"(found {len(train)} train, {len(val)} val)")
    largest = max(int(s.max()) for s in train + val if len(s))
    if vocab_size is None:
        vocab_size = largest + 1
    elif largest >= vocab_size:
        raise DataError(f"{directory}: token id {largest} does not fit --vocab-size {vocab_size}")
    return Dataset(train, val, vocab_size, description)


def build_stdlib_corpus(cache_dir: Path) -> Path:
    """Prepare (once) the built-in corpus and return its shard directory."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        (p.relative_to(stdlib).as_posix(), p) for p in stdlib.rglob("*.py")
        if not {"site-packages", "dist-packages"} & set(p.relative_to(stdlib).parts)
    )
    if not files:
        raise DataError(f"no Python sources found under {stdlib} to build the default corpus; pass --data")
    # Order by a fixed hash of the path, not alphabetically: any prefix of the stream (a short run sees
    # only a prefix) is then a fair sample of the library rather than, say, only the encodings tables.
    files.sort(key=lambda f: (zlib.crc32(f[0].encode(), 1), f[0]))
    fingerprint = hashlib.sha256("\n".join(f"{rel}:{p.stat().st_size}" for rel, p in files).encode()).hexdigest()[:12]
    out = cache_dir / f"stdlib-v{CORPUS_VERSION}-py{sys.version_info[0]}.{sys.version_info[1]}-{fingerprint}"
    if (out / "COMPLETE").exists():
        return out
    train, val = bytearray(), bytearray()
    for rel, p in files:
        # A fixed, content-independent choice of held-out files: the same on every run and machine.
        (val if zlib.crc32(rel.encode()) % 20 == 0 else train).extend(p.read_bytes() + b"\n")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for i in range(0, len(train), SHARD_TOKENS):
        np.save(tmp / f"train_{i // SHARD_TOKENS:03d}.npy", np.frombuffer(bytes(train[i:i + SHARD_TOKENS]), np.uint8))
    np.save(tmp / "val_000.npy", np.frombuffer(bytes(val), np.uint8))
    (tmp / "COMPLETE").write_text(f"{len(files)} files, {len(train)} train bytes, {len(val)} val bytes\n")
    try:
        tmp.rename(out)  # atomic: a half-built corpus never carries the final name
    except OSError:
        shutil.rmtree(tmp)  # another process finished first; its corpus is identical
    return out


class TokenWindows:
    """The windows of one split: `block_size + 1` consecutive tokens inside one shard, on a grid.

    Window starts lie on a grid of `block_size` tokens shifted by a `phase` in [0, block_size); a
    window never crosses a shard's end. Every phase gives each shard the same number of windows
    (`len // block_size - 1`), so an epoch's length does not depend on its phase.
    """

    def __init__(self, shards: list[np.ndarray], block_size: int, *, name: str) -> None:
        self.shards, self.block_size = shards, block_size
        counts = [max(0, len(s) // block_size - 1) for s in shards]
        self.count = sum(counts)
        if self.count == 0:
            raise DataError(f"the {name} split has {sum(len(s) for s in shards)} tokens; one window needs "
                            f"{2 * block_size} in one shard (lower --block-size, or give more data)")
        self._first = np.cumsum([0, *counts])  # global index of each shard's first window

    def position(self, index: int, phase: int = 0) -> tuple[int, int]:
        """(shard, token offset) of window `index`."""
        shard = int(np.searchsorted(self._first, index, side="right")) - 1
        return shard, phase + (index - int(self._first[shard])) * self.block_size

    def gather(self, indices: np.ndarray | list[int], phase: int = 0, *, pin: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (B x block_size, int64) for the windows `indices`."""
        T = self.block_size
        rows = []
        for index in indices:
            shard, pos = self.position(int(index), phase)
            rows.append(np.asarray(self.shards[shard][pos:pos + T + 1], dtype=np.int64))
        buf = torch.from_numpy(np.stack(rows))
        x, y = buf[:, :-1].contiguous(), buf[:, 1:].contiguous()
        if pin:  # so that the copies to the GPU are really asynchronous
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    @cached_property
    def fingerprint(self) -> str:
        """Identifies the data (sizes and the first bytes of every shard), to detect a change on resume.

        Computed once: every save records it, and the shards do not change under a run.
        """
        h = hashlib.sha256(str([len(s) for s in self.shards]).encode())
        for s in self.shards:
            h.update(np.ascontiguousarray(s[:4096]).tobytes())
        return h.hexdigest()[:16]


class ShuffledSampler(SampleOrder):
    """Which training windows each optimizer step reads: a `SampleOrder` over the windows of the split.

    Every epoch visits all windows once, in an order drawn from (seed, epoch), with the window grid
    shifted by a phase drawn from the same pair (so the cut points differ from epoch to epoch).
    """

    def __init__(self, windows: TokenWindows, batch_size: int, seed: int) -> None:
        super().__init__(windows.count, batch_size, seed)
        self.windows = windows
        self._phases: dict[int, int] = {}

    def _draw(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        self._phases = {e: p for e, p in self._phases.items() if e == epoch - 1}
        self._phases[epoch] = int(rng.integers(self.windows.block_size))
        return rng.permutation(self.windows.count)

    def _epoch_order(self) -> tuple[int, np.ndarray]:
        order = self.permutation(self.epoch)
        return self._phases[self.epoch], order

    def micro_batch(self, k: int, size: int, *, pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch `k` (of `size` windows) of the next step."""
        phase, order = self._epoch_order()
        start = self.index + k * size
        return self.windows.gather(order[start:start + size], phase, pin=pin)

    def state_dict(self) -> dict[str, Any]:
        phase, order = self._epoch_order()
        shard, pos = self.windows.position(int(order[self.index]), phase) if self.index < len(order) else (0, 0)
        return {"epoch": self.epoch, "index": self.index, "curr_shard": shard, "curr_pos": pos,
                "fingerprint": self.windows.fingerprint}
