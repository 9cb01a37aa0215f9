"""Numeric odds and ends: root finding, integration and interpolation.

Everything here works on plain Python floats and callables, which keeps
the functions easy to read and easy to test against closed-form answers.
"""
import math
from bisect import bisect_right
from typing import Callable, Sequence

Func = Callable[[float], float]


def bisect_root(f: Func, lo: float, hi: float, tol: float = 1e-12,
                max_iter: int = 200) -> float:
    """Find x in [lo, hi] with f(x) == 0, given f(lo), f(hi) differ in sign."""
    flo, fhi = f(lo), f(hi)
    if flo == 0:
        return lo
    if fhi == 0:
        return hi
    if flo * fhi > 0:
        raise ValueError("f(lo) and f(hi) must have opposite signs")
    for _ in range(max_iter):
        mid = (lo + hi) / 2
        fmid = f(mid)
        if fmid == 0 or (hi - lo) / 2 < tol:
            return mid
        if flo * fmid < 0:
            hi = mid
        else:
            lo, flo = mid, fmid
    return (lo + hi) / 2


def newton(f: Func, df: Func, x0: float, tol: float = 1e-12,
           max_iter: int = 50) -> float:
    """Newton's method; raises if the derivative vanishes or it diverges."""
    x = x0
    for _ in range(max_iter):
        d = df(x)
        if d == 0:
            raise ZeroDivisionError(f"derivative is zero at x={x}")
        step = f(x) / d
        x -= step
        if abs(step) < tol * max(1.0, abs(x)):
            return x
    raise RuntimeError("newton did not converge")


def simpson(f: Func, a: float, b: float, n: int = 100) -> float:
    """Composite Simpson's rule with n (even) sub-intervals."""
    if n % 2:
        n += 1
    h = (b - a) / n
    total = f(a) + f(b)
    for i in range(1, n):
        total += (4 if i % 2 else 2) * f(a + i * h)
    return total * h / 3


def interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear interpolation; clamps outside the table."""
    if len(xs) != len(ys) or not xs:
        raise ValueError("xs and ys must be non-empty and the same length")
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    i = bisect_right(xs, x) - 1
    t = (x - xs[i]) / (xs[i + 1] - xs[i])
    return ys[i] + t * (ys[i + 1] - ys[i])


if __name__ == "__main__":
    # sqrt(2) two ways
    print(bisect_root(lambda x: x * x - 2, 0, 2))
    print(newton(lambda x: x * x - 2, lambda x: 2 * x, 1.0))
    # integral of sin on [0, pi] is exactly 2
    print(simpson(math.sin, 0, math.pi))
    # boiling point of water (C) against altitude (m), rough table
    alt = [0, 1000, 2000, 3000]
    boil = [100.0, 96.7, 93.4, 90.0]
    print(round(interp(alt, boil, 1500), 2))
