"""Which samples each step reads, and the DataLoader that reads them: shuffled, resumable, elastic.

    order = SampleOrder(len(train_set), batch_size=64, seed=1337)
    loader = StepLoader(train_set, order, rank=0, world=1, accum=1, size=64, workers=2, pin=False)
    batch = loader.micro_batch(k=0)         # micro-batch 0 of the step at order's (epoch, index)
    order.advance()

Every epoch visits all samples once, in a permutation drawn from (seed, epoch). A step takes the
next `batch_size` samples of it; micro-batch k is samples [k·m, (k+1)·m) of the step, and rank r
computes the micro-batches k ≡ r (mod world size). The position is (epoch, index) alone, plain
data in every checkpoint, so a resume reads exactly the next samples on any number of ranks.

Random augmentation stays bitwise the same after a resume, and independent of the number of
DataLoader workers and ranks: every `dataset[i]` of epoch e runs with torch's (CPU), NumPy's and
Python's global generators seeded from (seed, e, i), the way ecosystem transforms draw. Choices
shared by a whole epoch (the built-in GPT shifts its window grid) come from the epoch's own
generator: a training set may define `at_epoch(epoch, rng)`, returning itself as that epoch reads
it, and the permutation is drawn from the same generator after it.
"""

from __future__ import annotations

import hashlib
import random
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from .config import DataError

T = TypeVar("T")


def epoch_generator(seed: int, epoch: int) -> np.random.Generator:
    """The generator of epoch `epoch`: its shared choices (`at_epoch`), then its permutation."""
    return np.random.default_rng([seed, epoch])


def at_epoch(dataset: Any, epoch: int, rng: np.random.Generator) -> Any:
    """The training set as epoch `epoch` reads it: its `at_epoch(epoch, rng)` if it defines one."""
    hook = getattr(dataset, "at_epoch", None)
    return hook(epoch, rng) if callable(hook) else dataset


def _for_epoch(cache: dict[int, T], epoch: int, make: Callable[[int], T]) -> T:
    """`cache[epoch]`, made on first use; only the epoch before it is kept beside it (a loader reading
    ahead crosses into the next epoch while the current one is still asked for)."""
    if epoch not in cache:
        for old in [e for e in cache if e != epoch - 1]:
            del cache[old]
        cache[epoch] = make(epoch)
    return cache[epoch]


class SampleOrder:
    """The data position of a run: (epoch, index of the next step's first sample in the epoch's order)."""

    def __init__(self, dataset: Any, batch_size: int, seed: int) -> None:
        self.dataset, self.count, self.batch_size, self.seed = dataset, len(dataset), batch_size, seed
        self.steps_per_epoch = self.count // batch_size
        self.epoch, self.index = 0, 0
        # The two newest epochs asked for: (the training set as the epoch reads it, its permutation).
        self._epochs: dict[int, tuple[Any, np.ndarray]] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        return self._drawn(epoch)[1]

    def view(self, epoch: int) -> Any:
        """The training set as epoch `epoch` reads it (see `at_epoch`)."""
        return self._drawn(epoch)[0]

    def _drawn(self, epoch: int) -> tuple[Any, np.ndarray]:
        return _for_epoch(self._epochs, epoch, self._draw)

    def _draw(self, epoch: int) -> tuple[Any, np.ndarray]:
        rng = epoch_generator(self.seed, epoch)
        view = at_epoch(self.dataset, epoch, rng)  # drawn first: the permutation comes after it
        return view, rng.permutation(self.count)

    def micro_batch_indices(self, k: int, size: int) -> np.ndarray:
        """The sample indices of micro-batch `k` (of `size` samples) of the next step."""
        start = self.index + k * size
        return self.permutation(self.epoch)[start:start + size]

    def positions(self, rank: int, world: int, accum: int) -> Iterator[tuple[int, int, int]]:
        """(epoch, index, k) of every micro-batch this rank computes, from the current position on."""
        epoch, index = self.epoch, self.index
        while True:
            for micro in range(accum):
                yield epoch, index, micro * world + rank
            index += self.batch_size
            if index + self.batch_size > self.count:
                epoch, index = epoch + 1, 0

    def advance(self) -> bool:
        """Move past the step just taken; True if that step finished an epoch (a partial batch is dropped)."""
        self.index += self.batch_size
        if self.index + self.batch_size <= self.count:
            return False
        self.epoch, self.index = self.epoch + 1, 0
        return True

    def restart(self) -> None:
        """Start a new epoch now (used when the data changed under a resumed run)."""
        if self.index:
            self.epoch, self.index = self.epoch + 1, 0

    def steps_left(self, num_epochs: int) -> int:
        return max(0, (num_epochs - self.epoch) * self.steps_per_epoch - self.index // self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        """The position, and where its next sample lies if the training set says (`position(i)`, for readers)."""
        where = getattr(self.view(self.epoch), "position", None)
        located = where(int(self.permutation(self.epoch)[self.index])) if callable(where) and self.count else {}
        return {**located, "epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < max(1, self.count):
            raise DataError(f"the checkpoint's data position (epoch {epoch}, sample {index}) is outside this data")
        self.epoch, self.index = epoch, index


def evenly_spread(total: int, count: int) -> list[int]:
    """`count` indices spread evenly over `total` items (cycling when there are fewer): the held-out
    samples every evaluation reads, the same whatever the number of ranks. A prefix would be a few
    files of a split; an even spread represents all of it."""
    return [(k * total) // count for k in range(count)] if count <= total else [k % total for k in range(count)]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample `index` in epoch `epoch`: the same in every process, worker and rank."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _seed_globals(seed: int) -> None:
    # torch's CPU generator only: torch.manual_seed would also reseed (or queue a reseed of) every CUDA
    # generator, at ~100 µs a call, and the CUDA state is not put back below.
    torch.random.default_generator.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@contextmanager
def _globals_put_back() -> Iterator[None]:
    saved = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        torch.random.set_rng_state(saved[0])
        np.random.set_state(saved[1])
        random.setstate(saved[2])


@contextmanager
def seeded_globals(seed: int) -> Iterator[None]:
    """Run a block with torch's (CPU), NumPy's and Python's global generators seeded, then put them back."""
    with _globals_put_back():
        _seed_globals(seed)
        yield


class KeyedSamples(Dataset):
    """`dataset[i]` of epoch e, read by key (e, i) with the generators seeded from (seed, e, i).

    With `by_epoch`, sample i of epoch e comes from the set as that epoch reads it (`at_epoch`);
    held-out sets are read as they are.
    """

    def __init__(self, dataset: Any, seed: int, *, by_epoch: bool = True) -> None:
        self.dataset, self.seed, self.by_epoch = dataset, seed, by_epoch
        self._views: dict[int, Any] = {}  # the two newest epochs read

    def _set(self, epoch: int) -> Any:
        if not self.by_epoch:
            return self.dataset
        # Each worker draws the same view from the epoch's generator, as SampleOrder does.
        return _for_epoch(self._views, epoch, lambda e: at_epoch(self.dataset, e, epoch_generator(self.seed, e)))

    def _read(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        _seed_globals(sample_seed(self.seed, epoch, index))
        return self._set(epoch)[index]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        with _globals_put_back():
            return self._read(key)

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[Any]:
        """A batch (what a DataLoader fetches): the generators are saved and put back once, not per sample."""
        with _globals_put_back():
            return [self._read(key) for key in keys]

    def __len__(self) -> int:
        return len(self.dataset)


def _ignore_stop_signals(_: int) -> None:
    # The main process decides when to stop (signals.GracefulStop) and shuts its workers down; a
    # scheduler's SIGTERM to the whole process group must not kill a worker under it first.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class _Keys:
    """The DataLoader's batch sampler: the keys of this rank's micro-batches, from a position on."""

    def __init__(self, order: SampleOrder, rank: int, world: int, accum: int, size: int) -> None:
        self.order, self.args, self.size = order, (rank, world, accum), size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for epoch, index, k in self.order.positions(*self.args):
            start = index + k * self.size
            yield [(epoch, int(i)) for i in self.order.permutation(epoch)[start:start + self.size]]


def make_loader(dataset: Dataset, batch_sampler: Any, *, workers: int, pin: bool,
                collate: Callable[[list[Any]], Any] | None) -> DataLoader:
    # A generator of its own: a new iterator draws its workers' base seed from it, not from the
    # global generator the training loop's state holds (samples are seeded by key anyway).
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, pin_memory=pin,
                      collate_fn=collate or default_collate, worker_init_fn=_ignore_stop_signals if workers else None,
                      prefetch_factor=4 if workers else None, generator=torch.Generator())


class StepLoader:
    """This rank's micro-batches, read ahead by DataLoader workers in the order the steps take them.

    `micro_batch(k)` returns micro-batch k of the step at the order's current position. The workers
    read ahead from where the loader was (re)started; a request for another position (after a
    restore, or a step a stop abandoned) starts the loader again from there.
    """

    def __init__(self, dataset: Any, order: SampleOrder, *, rank: int, world: int, accum: int, size: int,
                 workers: int, pin: bool, collate: Callable[[list[Any]], Any] | None = None) -> None:
        self.samples = KeyedSamples(dataset, order.seed)
        self.order, self.rank, self.world, self.accum, self.size = order, rank, world, accum, size
        self.workers, self.pin, self.collate = workers, pin, collate
        self._batches: Iterator[Any] | None = None
        self._expected: Iterator[tuple[int, int, int]] | None = None
        self._next: tuple[int, int, int] | None = None

    def micro_batch(self, k: int) -> Any:
        wanted = (self.order.epoch, self.order.index, k)
        if self._batches is None or self._next != wanted:
            self.close()
            keys = _Keys(self.order, self.rank, self.world, self.accum, self.size)
            self._batches = iter(make_loader(self.samples, keys, workers=self.workers, pin=self.pin,
                                             collate=self.collate))
            self._expected = self.order.positions(self.rank, self.world, self.accum)
            self._next = next(self._expected)
            if self._next != wanted:
                raise ValueError(f"micro-batch {k} is not one this rank computes (rank {self.rank} of {self.world})")
        assert self._expected is not None
        self._next = next(self._expected)
        return next(self._batches)

    def close(self) -> None:
        """Stop the workers (they are started again on the next request)."""
        self._batches = self._expected = self._next = None
