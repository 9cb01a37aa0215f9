"""Run-length encoding for strings, with a compact text format.

"aaabccdddd" <-> "3a1b2c4d".  Digits in the input are escaped with a
backslash so the encoded form stays unambiguous.
"""
from itertools import groupby
from typing import Iterable, List, Tuple


def runs(text: str) -> List[Tuple[str, int]]:
    """Split text into (character, count) pairs."""
    return [(ch, sum(1 for _ in grp)) for ch, grp in groupby(text)]


def encode(text: str) -> str:
    parts = []
    for ch, n in runs(text):
        if ch.isdigit() or ch == "\\":
            ch = "\\" + ch
        parts.append(f"{n}{ch}")
    return "".join(parts)


def decode(encoded: str) -> str:
    out = []
    i = 0
    while i < len(encoded):
        j = i
        while j < len(encoded) and encoded[j].isdigit():
            j += 1
        if j == i:
            raise ValueError(f"expected a count at position {i}")
        count = int(encoded[i:j])
        if j < len(encoded) and encoded[j] == "\\":
            j += 1
        if j >= len(encoded):
            raise ValueError("count without a character at end of input")
        out.append(encoded[j] * count)
        i = j + 1
    return "".join(out)


def ratio(text: str) -> float:
    """Encoded length divided by original length (lower is better)."""
    return len(encode(text)) / len(text) if text else 1.0


def _check(samples: Iterable[str]) -> None:
    for s in samples:
        assert decode(encode(s)) == s, s


if __name__ == "__main__":
    samples = ["aaabccdddd", "", "x", "112233", "a\\\\b", "wwwwwwwwwwwwbbb"]
    _check(samples)
    for s in samples:
        print(f"{s!r:>20} -> {encode(s)!r:<16} ratio {ratio(s):.2f}")
