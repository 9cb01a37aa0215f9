"""Fixed-size ring buffer with O(1) append and a running mean.

环形缓冲区: 写满之后, 新数据覆盖最旧的数据.
"""
from typing import Generic, Iterator, List, Optional, TypeVar

T = TypeVar("T")


class RingBuffer(Generic[T]):
    __slots__ = ("_data", "_start", "_size")

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._data: List[Optional[T]] = [None] * capacity
        self._start = 0   # index of the oldest element
        self._size = 0

    @property
    def capacity(self) -> int:
        return len(self._data)

    def __len__(self) -> int:
        return self._size

    def is_full(self) -> bool:
        return self._size == self.capacity

    def append(self, value: T) -> Optional[T]:
        """Add a value; return the element it overwrote, if any."""
        end = (self._start + self._size) % self.capacity
        evicted = None
        if self.is_full():
            evicted = self._data[end]
            self._start = (self._start + 1) % self.capacity
        else:
            self._size += 1
        self._data[end] = value
        return evicted

    def popleft(self) -> T:
        if not self._size:
            raise IndexError("pop from empty ring buffer")
        value = self._data[self._start]
        self._data[self._start] = None
        self._start = (self._start + 1) % self.capacity
        self._size -= 1
        return value  # type: ignore[return-value]

    def __getitem__(self, i: int) -> T:
        if i < 0:
            i += self._size
        if not 0 <= i < self._size:
            raise IndexError("ring buffer index out of range")
        return self._data[(self._start + i) % self.capacity]  # type: ignore

    def __iter__(self) -> Iterator[T]:
        for i in range(self._size):
            yield self[i]

    def __repr__(self) -> str:
        return f"RingBuffer({list(self)!r}, capacity={self.capacity})"


class MovingAverage:
    """Mean of the last ``n`` samples, updated in constant time."""

    def __init__(self, n: int):
        self._buf: RingBuffer[float] = RingBuffer(n)
        self._total = 0.0

    def add(self, x: float) -> float:
        old = self._buf.append(x)
        self._total += x - (old or 0.0)
        return self._total / len(self._buf)


if __name__ == "__main__":
    avg = MovingAverage(3)
    for sample in [4, 8, 6, 10, 2]:
        print(sample, "->", round(avg.add(sample), 3))
