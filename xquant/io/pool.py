"""Reusable memory and worker threads for the per-tensor kernels: output buffers for producers
whose tensors are written and then dropped, per-thread scratch blocks, and `parallel_map`.

Fresh memory is expensive on the machines this runs on: the first touch of every page is a page
fault, and in a VM whose host backs guest memory lazily (this one) it costs ~6 µs a page, about
1.4 s per GB, more than the arithmetic of a delta. A producer that takes its output from a pool,
and has it handed back once written, touches each page once per run instead of once per tensor.

The pipeline already bounds the tensors in flight (one being made, one queued, one being
written), so by default the pool never waits: when every buffer is lent out it hands out fresh
memory (a pool with `wait` holds the producer back instead, see BufferPool).
For the same reason kernels that go block by block (casts, quantizers) keep their temporaries
in a `scratch` block of the thread that runs them, and `parallel_map` spreads the blocks over
the cores on threads made once.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


class BufferPool:
    """`count` buffers of `nbytes`. With `wait` (seconds), a request finding every buffer lent
    waits that long for one to come back before it takes fresh memory: a producer faster than
    its writer then holds at most `count` outputs, not one more per step it is ahead."""

    def __init__(self, nbytes: int, count: int = 3, wait: float = 0.0):
        self.nbytes = nbytes
        self._count = count
        self._wait = wait
        self._free: list[torch.Tensor] = []
        self._lent: dict[int, torch.Tensor] = {}
        self._made = 0
        self._lock = threading.Condition()

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor, in a pooled buffer when one is free and large enough."""
        n = dtype.itemsize * math.prod(shape)
        block = self._take() if 0 < n <= self.nbytes else None
        if block is None:
            return torch.empty(shape, dtype=dtype)
        return block[:n].view(dtype).reshape(shape)

    def _take(self) -> torch.Tensor | None:
        with self._lock:
            # a bounded wait: should the writer stop (an error), the producer still finishes
            self._lock.wait_for(lambda: self._free or self._made < self._count, timeout=self._wait)
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
                self._lock.notify()


# Worker threads shared by the block-parallel kernels (casts, quantizers): torch's element-wise
# casts and ggml's rows run on one core per call, but they release the GIL, so independent row
# blocks on several threads use every core. Made once: a pool per tensor would start threads
# thousands of times in a conversion.
_workers: ThreadPoolExecutor | None = None
_workers_lock = threading.Lock()
_local = threading.local()


def cores() -> int:
    return os.cpu_count() or 1


def _pool() -> ThreadPoolExecutor:
    """The workers, each with torch's own intra-op parallelism off: the blocks are the parallelism.
    Left on, every op of a block would fork onto every core again from each worker (OpenMP teams
    per thread), which measured 2x slower for q8_0 on 2 cores. torch's setting is per thread once a
    thread has run an op; the process-wide default that set_num_threads also changes (what threads
    started later take) is put back as it was once every worker has set its own."""
    global _workers
    with _workers_lock:
        if _workers is None:
            n = cores()
            default = torch.get_num_threads()
            workers = ThreadPoolExecutor(n, thread_name_prefix="xquant-block", initializer=_one_torch_thread)
            started = threading.Barrier(n)
            list(workers.map(lambda _: started.wait(), range(n)))  # n distinct threads, each set
            torch.set_num_threads(default)
            _workers = workers
        return _workers


def _one_torch_thread() -> None:
    torch.get_num_threads()  # torch reads its default into a thread on first use: do that first,
    torch.set_num_threads(1)  # so that this setting is the one the thread keeps


def parallel_map(fn: Callable[[T], R], items: Sequence[T], threads: int | None = None) -> list[R]:
    """[fn(item) for item in items] on up to `threads` worker threads (default and at most: one per
    core). Items are handed out one at a time, so a thread slowed by other work (the sha256 thread
    shares the cores) takes fewer. The first exception is raised here once every thread has
    stopped. Even one thread is a worker, not the caller: on a busy machine torch's intra-op
    threads, waiting for each other at every op, made 0.1 s of q8_0 take 9 s on the caller's
    thread. `fn` must not call parallel_map itself."""
    n = min(threads or cores(), cores(), len(items))
    if n == 0:
        return []
    results: list = [None] * len(items)
    next_item = iter(range(len(items)))
    take = threading.Lock()
    failed = threading.Event()

    def work() -> None:
        while not failed.is_set():
            with take:
                i = next(next_item, None)
            if i is None:
                return
            try:
                results[i] = fn(items[i])
            except BaseException:
                failed.set()
                raise

    futures = [_pool().submit(work) for _ in range(n)]
    try:
        errors = [f.exception() for f in futures]  # waits for each
    except BaseException:  # interrupted while waiting: the workers take no more items
        failed.set()
        raise
    for e in errors:
        if e is not None:
            raise e
    return results


def scratch(key: str, count: int, dtype: torch.dtype) -> torch.Tensor:
    """A reusable block of `count` values owned by the calling thread (one per key): kernels that
    work block by block keep their temporaries in one small buffer that stays in the core's
    cache, instead of fresh memory per block (a page fault per 4 KiB, see above)."""
    blocks = _local.__dict__.setdefault("blocks", {})
    block = blocks.get((key, dtype))
    if block is None or block.numel() < count:
        block = blocks[(key, dtype)] = torch.empty(count, dtype=dtype)
    return block[:count]
