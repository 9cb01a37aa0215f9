"""A few reusable output buffers for producers whose tensors are written and then dropped.

Fresh memory is expensive on the machines this runs on: the first touch of every page is a page
fault, and in a VM whose host backs guest memory lazily (this one) it costs ~6 µs a page, about
1.4 s per GB, more than the arithmetic of a delta. A producer that takes its output from a pool,
and has it handed back once written, touches each page once per run instead of once per tensor.

The pipeline already bounds the tensors in flight (one being made, one queued, one being
written), so the pool never waits: when every buffer is lent out it hands out fresh memory.
"""

from __future__ import annotations

import math
import threading

import torch


class BufferPool:
    def __init__(self, nbytes: int, count: int = 3):
        self.nbytes = nbytes
        self._count = count
        self._free: list[torch.Tensor] = []
        self._lent: dict[int, torch.Tensor] = {}
        self._made = 0
        self._lock = threading.Lock()

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor, in a pooled buffer when one is free and large enough."""
        n = dtype.itemsize * math.prod(shape)
        block = self._take() if 0 < n <= self.nbytes else None
        if block is None:
            return torch.empty(shape, dtype=dtype)
        return block[:n].view(dtype).reshape(shape)

    def _take(self) -> torch.Tensor | None:
        with self._lock:
            if self._free:
                block = self._free.pop()
            elif self._made < self._count:
                self._made += 1
                block = torch.empty(self.nbytes, dtype=torch.uint8)
            else:
                return None
            self._lent[block.data_ptr()] = block
            return block

    def recycle(self, tensor: torch.Tensor) -> None:
        """Hand a tensor's buffer back once nothing reads it any more (a no-op for other tensors)."""
        with self._lock:
            block = self._lent.pop(tensor.data_ptr(), None)
            if block is not None:
                self._free.append(block)
