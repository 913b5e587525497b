"""RNG state as plain data, so a checkpoint loads with `torch.load(weights_only=True)`.

numpy's and Python's generator states are stored as lists of ints, never as numpy objects.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def snapshot_rng() -> tuple[Any, Any, torch.Tensor, list[torch.Tensor] | None]:
    """The raw generator states, cheaply (taken after every optimizer step); see `as_plain_rng_state`."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return random.getstate(), np.random.get_state(legacy=True), torch.get_rng_state(), cuda


def as_plain_rng_state(snapshot: tuple[Any, Any, torch.Tensor, list[torch.Tensor] | None]) -> dict[str, Any]:
    """A snapshot as plain data for a checkpoint (done only when saving)."""
    (version, internal, gauss_next), np_state, torch_state, cuda = snapshot
    bit_generator, keys, pos, has_gauss, cached_gaussian = np_state
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {"bit_generator": bit_generator, "keys": [int(k) for k in keys], "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch_state,
    }
    if cuda is not None:
        state["torch_cuda"] = cuda
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    n = state["numpy"]
    np.random.set_state((n["bit_generator"], np.array(n["keys"], dtype=np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "torch_cuda" in state and torch.cuda.is_available():
        # One state per device of the saving machine: an elastic resume may see fewer (or more) devices.
        # Each present device gets its own; the per-micro-batch manual_seed seeds every device anyway.
        for device, device_state in enumerate(state["torch_cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, device)
