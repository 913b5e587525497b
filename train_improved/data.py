"""Token data: the built-in corpus, user text, pre-tokenized shards, and their windows as a dataset.

`--data` may be
  * nothing: the built-in corpus, made at first use from this Python's standard library sources
    (real text on every machine, nothing downloaded), byte-level, prepared once into token shards
    under the cache directory; files are ordered by a fixed hash of their relative path, and about
    5% of them, chosen by another such hash, form the fixed held-out split;
  * a UTF-8 text file, or a directory of .txt files (sorted), byte-level; the last 10% is held out;
  * a directory of token shards, *.npy or nanoGPT-style *.bin (raw uint16), split into train and
    val by file name.
Training reads windows of `block_size + 1` tokens (`TokenWindows`, a map-style dataset) in a
shuffled order per epoch (`samples.SampleOrder`): independent windows in every batch, as nanoGPT
samples them, with a position (epoch, index) that checkpoints store, so a resume continues with
exactly the next batch on any number of ranks. Each epoch shifts the window grid by a phase drawn
from the epoch's generator (`TokenWindows.at_epoch`), so the cut points differ from epoch to epoch.
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import sys
import sysconfig
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from .config import DataError

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

    A map-style dataset: window i is (inputs, targets), each `block_size` int64 tokens. Window starts
    lie on a grid of `block_size` tokens shifted by a `phase` in [0, block_size); a window never
    crosses a shard's end. Every phase gives each shard the same number of windows
    (`len // block_size - 1`), so an epoch's length does not depend on its phase.
    """

    def __init__(self, shards: list[np.ndarray], block_size: int, *, name: str, description: str = "") -> None:
        self.shards, self.block_size, self.description = shards, block_size, description
        self.phase = 0
        counts = [max(0, len(s) // block_size - 1) for s in shards]
        self.count = sum(counts)
        if self.count == 0:
            raise DataError(f"the {name} split has {sum(len(s) for s in shards)} tokens; one window needs "
                            f"{2 * block_size} in one shard (lower --block-size, or give more data)")
        self._first = np.cumsum([0, *counts])  # global index of each shard's first window

    @property
    def tokens_per_sample(self) -> int:
        return self.block_size

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        shard, pos = self._locate(int(index))
        row = torch.from_numpy(np.asarray(self.shards[shard][pos:pos + self.block_size + 1], dtype=np.int64))
        return row[:-1], row[1:]  # targets are the inputs shifted by one token

    def at_epoch(self, epoch: int, rng: np.random.Generator) -> TokenWindows:
        """These windows as epoch `epoch` reads them: the grid shifted by a phase from the epoch's generator."""
        view = copy.copy(self)
        view.phase = int(rng.integers(self.block_size))
        return view

    def _locate(self, index: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self._first, index, side="right")) - 1
        return shard, self.phase + (index - int(self._first[shard])) * self.block_size

    def position(self, index: int) -> dict[str, int]:
        """Where window `index` starts: shard and token offset (the loader position checkpoints record)."""
        shard, pos = self._locate(index)
        return {"curr_shard": shard, "curr_pos": pos}

    @cached_property
    def fingerprint(self) -> str:
        """Identifies the data (sizes and the first bytes of every shard), to detect a change on resume.

        Computed once: every save records it, and the shards do not change under a run.
        """
        h = hashlib.sha256(str([len(s) for s in self.shards]).encode())
        for s in self.shards:
            h.update(np.ascontiguousarray(s[:4096]).tobytes())
        return h.hexdigest()[:16]
