"""Retention as pure policy: a policy maps a family's checkpoints (oldest first) to keep flags.

    >>> keep_last(2)([a, b, c])
    [False, True, True]

The store applies them per family, so no rotation can reach another family's files; and it never
deletes a protected name (the file being resumed from) whatever a policy says.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
Policy = Callable[[Sequence[T]], list[bool]]


def keep_last(n: int) -> Policy:
    """Keep the newest `n` items of a list sorted oldest first."""
    if n < 1:
        raise ValueError(f"keep_last needs n >= 1, got {n}")

    def policy(items: Sequence[T]) -> list[bool]:
        return [i >= len(items) - n for i in range(len(items))]

    return policy


def keep_best_n(n: int, mode: str) -> Policy:
    """Keep the `n` best of items that start with (value, step, ...), `mode` min or max; a tie goes to the
    earlier step, a missing value (a file ranked by another metric) ranks last."""

    def policy(items: Sequence[tuple[Any, ...]]) -> list[bool]:
        def rank(i: int) -> tuple[bool, float, int]:
            value, step = items[i][0], items[i][1]
            return value is None, (value or 0.0) * (1 if mode == "min" else -1), step

        kept = set(sorted(range(len(items)), key=rank)[:n])
        return [i in kept for i in range(len(items))]

    return policy


def keep_all(items: Sequence[T]) -> list[bool]:
    """Keep everything (epoch checkpoints are kept forever)."""
    return [True] * len(items)


def to_delete(items: Sequence[T], policy: Policy, protected: Callable[[T], bool]) -> list[T]:
    """Items the policy drops, minus protected ones."""
    return [item for item, keep in zip(items, policy(items), strict=True) if not keep and not protected(item)]
