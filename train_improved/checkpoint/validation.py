"""What `save()` refuses at once, in the caller's thread, instead of failing later in the writer.

    check_plain_data(state)        # TypeError naming the key path of the first value weights_only cannot load
    clean_metrics({"loss": t})     # 0-d tensors and numpy scalars become floats; NaN and inf are refused
    check_meta(meta)               # the footer's own keys cannot be overwritten

Every check is pure: no I/O, no torch import until a tensor is seen.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

# Keys the store writes into every footer itself (plus `args`, which has its own parameter): a `meta`
# holding one of them would be overwritten, or misread by the tools.
RESERVED_META_KEYS = frozenset({
    "args", "name", "kind", "step", "epoch", "metrics", "saved_at", "torch_version", "format_version",
    "algorithm", "digest", "payload_bytes", "shards", "lineage", "best",
})
_PLAIN = (str, int, float, bool, complex, bytes, bytearray, type(None))


def check_plain_data(state: Any, allowed: Iterable[Any] = ()) -> None:
    """Raise TypeError unless `torch.load(weights_only=True)` can load `state` back.

    Allowed: dicts, lists, tuples, sets, numbers, strings, bytes, None, tensors, torch sizes, dtypes
    and devices, plus the `allowed` types and whatever `torch.serialization.add_safe_globals` holds.
    """
    import torch

    extra = tuple(t for t in (*allowed, *torch.serialization.get_safe_globals()) if isinstance(t, type))
    simple = (torch.Tensor, torch.Size, torch.dtype, torch.device, torch.layout, torch.memory_format, *extra)

    def walk(obj: Any, path: str) -> None:
        # Exact types: numpy.float64 is a float subclass, an Enum member an int or str one; pickle names their class.
        if type(obj) in _PLAIN or isinstance(obj, simple):
            return
        if type(obj) in (dict, OrderedDict):
            for key, value in obj.items():
                if not isinstance(key, (str, int, float, bool, type(None))):
                    raise TypeError(f"{path}: the key {key!r} ({type(key).__name__}) is not plain data")
                walk(value, f"{path}[{key!r}]")
            return
        if type(obj) in (list, tuple, set, frozenset):
            for i, value in enumerate(obj):
                walk(value, f"{path}[{i}]")
            return
        raise TypeError(f"{path}: {_describe(obj)} is not plain data, so torch.load(weights_only=True) would "
                        f"refuse the checkpoint; {_how_to_fix(obj)}")

    walk(state, "state")


def _describe(obj: Any) -> str:
    kind = type(obj)
    module = kind.__module__
    return kind.__name__ if module in ("builtins", "__main__") else f"{module.split('.')[0]}.{kind.__name__}"


def _how_to_fix(obj: Any) -> str:
    import dataclasses

    if dataclasses.is_dataclass(obj):
        return "convert it with dataclasses.asdict"
    if type(obj).__module__.split(".")[0] == "numpy":
        return "convert it with .item() or .tolist() (or torch.from_numpy for arrays)"
    if hasattr(obj, "state_dict"):
        return "save its .state_dict() instead"
    return "convert it to dicts, lists, numbers and tensors, or allow its type with safe_globals"


def as_number(value: Any) -> float | None:
    """A metric value as a float (0-d tensors and numpy scalars converted), or None if it is not a number."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0 and not isinstance(value, (int, float)):
        value = value.item()  # a 0-d tensor or a numpy scalar
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """Metrics as plain floats: 0-d tensors and numpy scalars are converted; NaN, inf and others refused."""
    out = {}
    for key, value in (metrics or {}).items():
        if not isinstance(key, str):
            raise TypeError(f"metrics: the key {key!r} is not a string")
        number = as_number(value)
        if number is None:
            raise TypeError(f"metrics[{key!r}]: {_describe(value)} is not a number")
        if not math.isfinite(number):
            raise ValueError(f"metrics[{key!r}] is {number}: a checkpoint's metrics must be finite numbers")
        out[key] = number
    return out


def check_meta(meta: Mapping[str, Any] | None) -> None:
    """Refuse `meta` keys that the store itself writes into the footer."""
    if clash := sorted(RESERVED_META_KEYS & set(meta or {})):
        raise ValueError(f"meta key(s) {', '.join(map(repr, clash))} are reserved for the store's own footer "
                         f"fields ({', '.join(sorted(RESERVED_META_KEYS))}); rename them")
