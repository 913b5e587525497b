"""Snapshot a state dict into host buffers that are allocated once and reused across saves.

This copy is all the training loop waits for when saving asynchronously: a reused buffer is
already paged in, so the copy runs at memory bandwidth, whereas a fresh allocation page-faults
and on this class of machine costs more than the disk write it is meant to hide. On CUDA the
buffers are pinned and the copies are non-blocking on a side stream, synchronized before the
snapshot is handed to the writer.
"""

from __future__ import annotations

from typing import Any

import torch

_Path = tuple[Any, ...]


class StagingArea:
    """Holds at most one snapshot of a state: staging memory stays at 1x the state's tensor bytes."""

    def __init__(self) -> None:
        self._buffers: dict[_Path, torch.Tensor] = {}
        self._stream: torch.cuda.Stream | None = None

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def stage(self, state: Any) -> Any:
        """Return a copy of `state` whose tensors live in this area's buffers (valid until the next call)."""
        aliases: dict[tuple, torch.Tensor] = {}
        used_cuda = False

        def copy(obj: Any, path: _Path) -> Any:
            nonlocal used_cuda
            if isinstance(obj, torch.Tensor):
                # Tensors sharing memory (tied embeddings) stay shared, so torch.save writes them once.
                key = (obj.untyped_storage().data_ptr(), obj.storage_offset(), tuple(obj.shape),
                       obj.stride(), obj.dtype, obj.device)
                if key in aliases:
                    return aliases[key]
                buf = self._buffer(path, obj)
                if obj.is_cuda:
                    if not used_cuda:
                        # The side stream must see every write the training stream made so far.
                        self._cuda_stream().wait_stream(torch.cuda.current_stream(obj.device))
                    used_cuda = True
                    with torch.cuda.stream(self._cuda_stream()):
                        buf.copy_(obj.detach(), non_blocking=True)
                else:
                    buf.copy_(obj.detach())
                aliases[key] = buf
                return buf
            if isinstance(obj, dict):
                return {k: copy(v, path + (k,)) for k, v in obj.items()}
            if isinstance(obj, list):
                return [copy(v, path + (i,)) for i, v in enumerate(obj)]
            if isinstance(obj, tuple):
                return tuple(copy(v, path + (i,)) for i, v in enumerate(obj))
            return obj  # numbers, strings, None, torch.Size...: immutable, safe to share

        snapshot = copy(state, ())
        if used_cuda:
            self._cuda_stream().synchronize()
        return snapshot

    def _buffer(self, path: _Path, src: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(path)
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
            buf = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=src.is_cuda)
            self._buffers[path] = buf
        return buf

    def _cuda_stream(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream
