"""An LRU cache with per-entry expiry, plus a memoising decorator.

最近最少使用 (LRU) 缓存: 容量满时淘汰最久未访问的条目.
"""
import functools
import time
from collections import OrderedDict
from typing import Any, Callable, Hashable, Optional

_MISSING = object()


class LRUCache:
    def __init__(self, capacity: int = 128, ttl: Optional[float] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.capacity = capacity
        self.ttl = ttl
        self._clock = clock
        self._data: "OrderedDict[Hashable, tuple]" = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: Hashable, default: Any = None) -> Any:
        item = self._data.get(key, _MISSING)
        if item is _MISSING:
            self.misses += 1
            return default
        value, expires = item
        if expires is not None and self._clock() >= expires:
            del self._data[key]          # 已过期
            self.misses += 1
            return default
        self._data.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: Hashable, value: Any) -> None:
        expires = self._clock() + self.ttl if self.ttl else None
        self._data[key] = (value, expires)
        self._data.move_to_end(key)
        while len(self._data) > self.capacity:
            self._data.popitem(last=False)

    def __contains__(self, key: Hashable) -> bool:
        return self.get(key, _MISSING) is not _MISSING

    def __len__(self) -> int:
        return len(self._data)

    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def memoize(capacity: int = 256, ttl: Optional[float] = None):
    """Cache a function's results by its positional and keyword arguments."""
    def decorate(fn):
        cache = LRUCache(capacity, ttl)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            key = (args, tuple(sorted(kwargs.items())))
            value = cache.get(key, _MISSING)
            if value is _MISSING:
                value = fn(*args, **kwargs)
                cache.put(key, value)
            return value

        wrapper.cache = cache
        return wrapper
    return decorate


@memoize(capacity=64)
def slow_square(n: int) -> int:
    time.sleep(0.01)
    return n * n


if __name__ == "__main__":
    for n in [3, 4, 3, 3, 5, 4]:
        slow_square(n)
    c = slow_square.cache
    print(f"entries={len(c)} hits={c.hits} misses={c.misses} rate={c.hit_rate():.2f}")
