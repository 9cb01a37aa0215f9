"""Pure-Python matrix helpers.

Matrices are lists of rows.  These functions are meant for small sizes
(teaching, tests, config math), not for performance work.
"""
from typing import List, Sequence

Matrix = List[List[float]]


def zeros(rows: int, cols: int) -> Matrix:
    return [[0.0] * cols for _ in range(rows)]


def identity(n: int) -> Matrix:
    m = zeros(n, n)
    for i in range(n):
        m[i][i] = 1.0
    return m


def shape(a: Sequence[Sequence[float]]):
    return len(a), (len(a[0]) if a else 0)


def transpose(a: Matrix) -> Matrix:
    return [list(col) for col in zip(*a)]


def matmul(a: Matrix, b: Matrix) -> Matrix:
    n, k = shape(a)
    k2, m = shape(b)
    if k != k2:
        raise ValueError(f"cannot multiply {n}x{k} by {k2}x{m}")
    bt = transpose(b)
    return [[sum(x * y for x, y in zip(row, col)) for col in bt] for row in a]


def determinant(a: Matrix) -> float:
    """Determinant via Gaussian elimination with partial pivoting."""
    n, m = shape(a)
    if n != m:
        raise ValueError("determinant needs a square matrix")
    work = [row[:] for row in a]
    det = 1.0
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(work[r][col]))
        if abs(work[pivot][col]) < 1e-12:
            return 0.0
        if pivot != col:
            work[col], work[pivot] = work[pivot], work[col]
            det = -det
        det *= work[col][col]
        for r in range(col + 1, n):
            factor = work[r][col] / work[col][col]
            for c in range(col, n):
                work[r][c] -= factor * work[col][c]
    return det


def solve(a: Matrix, b: List[float]) -> List[float]:
    """Solve a x = b for square, non-singular a."""
    n = len(a)
    aug = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(aug[r][col]))
        if abs(aug[pivot][col]) < 1e-12:
            raise ValueError("matrix is singular")
        aug[col], aug[pivot] = aug[pivot], aug[col]
        for r in range(n):
            if r != col:
                f = aug[r][col] / aug[col][col]
                aug[r] = [x - f * y for x, y in zip(aug[r], aug[col])]
    return [aug[i][n] / aug[i][i] for i in range(n)]


if __name__ == "__main__":
    a = [[2.0, 1.0], [1.0, 3.0]]
    print("det =", determinant(a))          # 5.0
    print("x =", solve(a, [3.0, 5.0]))      # about [0.8, 1.4]
    print(matmul(a, identity(2)) == a)      # True
