"""Handing memory back to the system: the two calls the streaming readers and the delta arithmetic
share (Linux; each is a no-op where the C library lacks it)."""

from __future__ import annotations

import ctypes
import mmap
import sys

_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def drop_resident(address: int, length: int) -> bool:
    """MADV_DONTNEED over [address, address + length), widened to whole pages, of a private file
    mapping that nothing has written to: its pages stop counting against the process and are read
    back from the page cache on the next access (the file's own bytes: nothing is lost). Never on
    anonymous memory, which it would zero. False where it cannot be done."""
    if _LIBC is None or not hasattr(mmap, "MADV_DONTNEED") or length <= 0:
        return False
    start = address - address % mmap.PAGESIZE
    end = -(-(address + length) // mmap.PAGESIZE) * mmap.PAGESIZE
    return _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED) == 0


def can_drop() -> bool:
    return _LIBC is not None and hasattr(mmap, "MADV_DONTNEED")


def trim_heap() -> None:
    """Hand the free memory of glibc's heap back to the system (malloc_trim)."""
    trim = getattr(_LIBC, "malloc_trim", None) if _LIBC is not None else None
    if trim is not None:
        trim(0)
