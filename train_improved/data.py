"""Token data: the built-in corpus, user text, pre-tokenized shards, and a resumable loader.

`--data` may be
  * nothing: the built-in corpus, made at first use from this Python's standard library sources
    (real text on every machine, nothing downloaded), byte-level, prepared once into token shards
    under the cache directory; files are ordered by a fixed hash of their relative path, and about
    5% of them, chosen by another such hash, form the fixed held-out split;
  * a UTF-8 text file, or a directory of .txt files (sorted), byte-level; the last 10% is held out;
  * a directory of token shards, *.npy or nanoGPT-style *.bin (raw uint16), split into train and
    val by file name.
The loader reads sequentially and keeps an explicit position (shard, offset) that checkpoints
store, so a resume continues with exactly the next batch.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import sysconfig
import zlib
from dataclasses import dataclass
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
    return _split_text(b"".join(_read_bytes(p) for p in texts), vocab_size, f"{len(texts)} text files in {path}")


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


class TokenLoader:
    """Sequential batches of (x, y) from a list of shards, with an explicit, restorable position.

    With several ranks, each reads its own slice of every window so that ranks never overlap.
    """

    def __init__(self, shards: list[np.ndarray], batch_size: int, block_size: int,
                 *, rank: int = 0, world_size: int = 1, name: str = "train") -> None:
        self.batch_size, self.block_size = batch_size, block_size
        self.rank, self.world_size = rank, world_size
        self.span = batch_size * block_size * world_size  # tokens all ranks consume per batch
        self.shards = shards
        self.batches_per_pass = sum(max(0, (len(s) - 1) // self.span) for s in shards)
        if self.batches_per_pass == 0:
            need = self.span + 1
            raise DataError(f"the {name} split has {sum(len(s) for s in shards)} tokens; one batch needs {need} "
                            "(lower --mini-batch-size or --block-size, or give more data)")
        self.curr_shard = 0
        self.curr_pos = 0
        self._skip_short_shards()

    def _skip_short_shards(self) -> None:
        while self.curr_pos + self.span + 1 > len(self.shards[self.curr_shard]):
            self.curr_shard = (self.curr_shard + 1) % len(self.shards)
            self.curr_pos = 0

    def reset(self) -> None:
        self.curr_shard, self.curr_pos = 0, 0
        self._skip_short_shards()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = self.batch_size, self.block_size
        start = self.curr_pos + self.rank * B * T
        window = np.asarray(self.shards[self.curr_shard][start:start + B * T + 1], dtype=np.int64)
        buf = torch.from_numpy(window)
        x, y = buf[:-1].view(B, T), buf[1:].view(B, T)
        self.curr_pos += self.span
        self._skip_short_shards()
        return x, y

    def spread(self, n: int) -> list[dict[str, int]]:
        """`n` batch positions spread evenly over the whole split (for representative evaluations)."""
        starts = [(i, pos) for i, s in enumerate(self.shards) for pos in range(0, len(s) - self.span, self.span)]
        pick = [starts[(k * len(starts)) // n] for k in range(n)] if n <= len(starts) else starts * (n // len(starts) + 1)
        return [{"curr_shard": i, "curr_pos": pos} for i, pos in pick[:n]]

    def state_dict(self) -> dict[str, int]:
        return {"curr_shard": self.curr_shard, "curr_pos": self.curr_pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        shard, pos = int(state["curr_shard"]), int(state["curr_pos"])
        if not 0 <= shard < len(self.shards) or not 0 <= pos < len(self.shards[shard]):
            raise DataError(f"the checkpoint's data position (shard {shard}, offset {pos}) is outside this data; "
                            "was --data changed?")
        self.curr_shard, self.curr_pos = shard, pos
