"""Unit tests for a token-bucket rate limiter.

The limiter under test lives in python-06.py; a copy of the class is kept
inline here so the test module can run on its own.
"""
import unittest


class FakeClock:
    """A clock the tests can advance by hand."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class TokenBucket:
    def __init__(self, rate, capacity, clock):
        self.rate = rate
        self.capacity = capacity
        self.clock = clock
        self.tokens = float(capacity)
        self.stamp = clock()

    def _refill(self):
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def try_acquire(self, n=1):
        self._refill()
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False


class TokenBucketTest(unittest.TestCase):
    def setUp(self):
        self.clock = FakeClock()
        self.bucket = TokenBucket(rate=2.0, capacity=5, clock=self.clock)

    def test_starts_full(self):
        for _ in range(5):
            self.assertTrue(self.bucket.try_acquire())
        self.assertFalse(self.bucket.try_acquire())

    def test_refills_over_time(self):
        for _ in range(5):
            self.bucket.try_acquire()
        self.clock.advance(1.0)          # 2 tokens per second
        self.assertTrue(self.bucket.try_acquire())
        self.assertTrue(self.bucket.try_acquire())
        self.assertFalse(self.bucket.try_acquire())

    def test_never_exceeds_capacity(self):
        self.clock.advance(3600)
        self.bucket.try_acquire(0)
        self.assertEqual(self.bucket.tokens, 5)

    def test_bulk_acquire(self):
        self.assertTrue(self.bucket.try_acquire(4))
        self.assertFalse(self.bucket.try_acquire(2))
        self.clock.advance(0.5)
        self.assertTrue(self.bucket.try_acquire(2))

    def test_partial_tokens_accumulate(self):
        for _ in range(5):
            self.bucket.try_acquire()
        self.clock.advance(0.25)
        self.assertFalse(self.bucket.try_acquire())
        self.clock.advance(0.25)
        self.assertTrue(self.bucket.try_acquire())


if __name__ == "__main__":
    unittest.main()
