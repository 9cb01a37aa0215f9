"""sha256 of files, cached by (path, size, mtime) so that re-running a command on a 100 GB input
does not hash it again."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import threading
from pathlib import Path

from ..paths import cache_dir

CHUNK = 16 * 1024 * 1024


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _cache_path() -> Path:
    return cache_dir() / "sha256-cache.json"


def sha256_cached_many(paths: list[Path]) -> list[str]:
    """sha256 of several input files (cached as above); the uncached ones are hashed in parallel,
    one file per core (hashlib releases the GIL), and the cache is written once."""
    keys = []
    for p in paths:
        st = Path(p).resolve().stat()
        keys.append(f"{Path(p).resolve()}|{st.st_size}|{st.st_mtime_ns}")
    cache_file = _cache_path()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    todo = [(k, p) for k, p in zip(keys, paths) if k not in cache]
    if todo:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, min(len(todo), os.cpu_count() or 1))) as pool:
            for (key, _), digest in zip(todo, pool.map(lambda kp: sha256_file(kp[1]), todo)):
                cache[key] = digest
        try:
            try:  # another process may have added entries meanwhile: keep them
                cache = {**json.loads(cache_file.read_text()), **cache}
            except (OSError, ValueError):
                pass
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_file)
        except OSError:
            pass  # a cache we cannot write only costs time
    return [cache[k] for k in keys]


class FileHasher:
    """sha256 of a file being written, computed on its own thread over the part already written.

    The writer reports each finished byte range (`finished(begin, end)`; `head` is what lies
    before the first); the hasher follows the longest finished prefix of the file and reads it
    back through read-only mappings of at most CHUNK bytes (page-cache pages, no copy). So it
    never holds a caller's buffer, its resident memory stays bounded, ranges may finish in any
    order (the prefix waits for the gap), and with one hasher per file several files are hashed
    in parallel while later bytes are still being written. hashlib releases the GIL. `size` is
    the file's final size if known; `digest()` waits for the rest and checks it was all covered.
    """

    CHUNK = 64 << 20

    def __init__(self, fd: int, head: bytes = b"", size: int | None = None):
        self._fd, self._size = fd, size
        self._h = hashlib.sha256(head)
        self._hashed = self._ready = len(head)
        self._pending: dict[int, int] = {}  # finished spans beyond the prefix: begin -> end
        self._cond = threading.Condition()
        self._closing = self._cancelled = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="xquant-sha256", daemon=True)
        self._thread.start()

    def finished(self, begin: int, end: int) -> None:
        if end <= begin:
            return
        with self._cond:
            self._pending[begin] = end
            while self._ready in self._pending:
                self._ready = self._pending.pop(self._ready)
            self._cond.notify()

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while self._ready <= self._hashed and not (self._closing or self._cancelled):
                        self._cond.wait()
                    if self._cancelled or self._ready <= self._hashed:
                        return
                    target = self._ready
                while self._hashed < target:
                    self._update(self._hashed, min(self.CHUNK, target - self._hashed))
                    self._hashed += min(self.CHUNK, target - self._hashed)
        except BaseException as e:  # reported by digest()
            self._error = e

    def _update(self, offset: int, n: int) -> None:
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        m = mmap.mmap(self._fd, offset + n - start, access=mmap.ACCESS_READ, offset=start)
        try:
            with memoryview(m) as whole, whole[offset - start:] as part:
                self._h.update(part)
        finally:
            m.close()

    def digest(self, size: int | None = None) -> str:
        """The sha256, once every byte up to `size` (or the size given at creation) is hashed."""
        if size is not None:
            self._size = size
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._size is not None and self._hashed != self._size:
            raise RuntimeError(f"sha256 covered {self._hashed} of {self._size} bytes")  # a writer bug
        return self._h.hexdigest()

    def cancel(self) -> None:
        with self._cond:
            self._cancelled = True
            self._cond.notify()
        self._thread.join()
