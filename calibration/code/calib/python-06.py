"""Thread-safe rate limiters: a token bucket and a sliding-window log.

Both expose ``acquire(blocking=True)``.  The clock is injectable so the
classes can be tested without sleeping.
"""
import threading
import time
from collections import deque


class TokenBucket:
    """Allow bursts up to ``capacity`` and a sustained ``rate`` per second."""

    def __init__(self, rate: float, capacity: int, clock=time.monotonic):
        if rate <= 0 or capacity <= 0:
            raise ValueError("rate and capacity must be positive")
        self.rate = rate
        self.capacity = capacity
        self._clock = clock
        self._tokens = float(capacity)
        self._stamp = clock()
        self._lock = threading.Lock()

    def _refill(self) -> None:
        now = self._clock()
        elapsed = now - self._stamp
        self._tokens = min(self.capacity, self._tokens + elapsed * self.rate)
        self._stamp = now

    def acquire(self, n: int = 1, blocking: bool = True) -> bool:
        while True:
            with self._lock:
                self._refill()
                if self._tokens >= n:
                    self._tokens -= n
                    return True
                wait = (n - self._tokens) / self.rate
            if not blocking:
                return False
            time.sleep(wait)


class SlidingWindow:
    """At most ``limit`` events in any ``window``-second span."""

    def __init__(self, limit: int, window: float, clock=time.monotonic):
        self.limit = limit
        self.window = window
        self._clock = clock
        self._events = deque()
        self._lock = threading.Lock()

    def acquire(self, blocking: bool = True) -> bool:
        while True:
            with self._lock:
                now = self._clock()
                # drop timestamps that have slid out of the window
                while self._events and now - self._events[0] >= self.window:
                    self._events.popleft()
                if len(self._events) < self.limit:
                    self._events.append(now)
                    return True
                wait = self.window - (now - self._events[0])
            if not blocking:
                return False
            time.sleep(max(wait, 0.001))


def limited(limiter):
    """Decorator: call ``limiter.acquire()`` before every call."""
    def wrap(fn):
        def inner(*args, **kwargs):
            limiter.acquire()
            return fn(*args, **kwargs)
        inner.__name__ = fn.__name__
        inner.__doc__ = fn.__doc__
        return inner
    return wrap


if __name__ == "__main__":
    bucket = TokenBucket(rate=5, capacity=2)

    @limited(bucket)
    def ping(i):
        return f"ping {i} at {time.monotonic():.2f}"

    for i in range(6):
        print(ping(i))
