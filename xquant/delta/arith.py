"""The arithmetic of deltas, tensor in -> tensor out: float32 sums, rounded once to the output dtype.

`add_delta` is what apply-delta does to one tensor, `subtract_base` what make-delta does. Both
work on rows: the base may have fewer rows than the other operand (an expanded vocabulary), and
rows beyond the base's are copied as they are; `base=None` copies the whole tensor (a tensor the
delta stores whole). Work goes in chunks of CHUNK_ELEMENTS, so a tensor costs its inputs plus its
output, never a float32 copy of the whole tensor.

Speed: one fused `torch.add(a, b, out=o)` per chunk where it rounds exactly as "float32 sum, then
cast" would (see `_single_rounding`), and one `aminmax` pass to catch NaN/inf (on CPU, ~20x faster
than `torch.isfinite`); the precise diagnosis runs only once something is wrong.
"""

from __future__ import annotations

import contextlib
import math
import mmap
from dataclasses import dataclass
from typing import Iterator

import torch

from ..io.dtypes import dtype_name
from ..io.finite import NonFiniteError
from ..io.pages import can_drop, drop_resident
from ..io.readers import TensorReader

# 256 Ki elements (1 MiB as float32): a chunk's inputs and output stay in a core's L2 cache, so the
# NaN/inf scan right after the sum reads cache, not memory (measured 4-10x cheaper than at 4 Mi).
CHUNK_ELEMENTS = 1 << 18


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the elementwise passes on one thread, restoring torch's setting afterwards.

    They are memory-bound: one core adds or scans 256 Ki float16 values in ~0.2 ms, faster than the
    disk delivers them. Measured on a busy 2-core machine, two threads made the same passes 3-5x
    slower (each waits for the other at every chunk).
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1) if t.dim() == 0 else t.reshape(t.shape[0], -1)


def _row_chunks(rows: int, row_elements: int):
    step = max(1, CHUNK_ELEMENTS // max(1, row_elements))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


class _Consumed:
    """Hands the pages of an input held in a private, unwritten file mapping back to the page
    cache as the chunked pass moves past them (MADV_DONTNEED: read again from the file should
    anything touch them later, so nothing is lost). Without it every page of both inputs stays
    resident until the tensor is dropped: on a 32000 x 8192 float16 head that is 1 GB of file
    pages at the moment the output buffers are all in use, the peak of the run. Only for
    tensors that own their mapping (SafetensorsReader.get): on anonymous memory this would zero it."""

    STEP = 32 << 20  # bytes between two madvise calls

    def __init__(self, t: torch.Tensor):
        self.start = t.data_ptr()
        self.end = self.start + t.numel() * t.element_size()
        self.done = self.start - self.start % mmap.PAGESIZE

    def upto(self, nbytes: int, final: bool = False) -> None:
        """The first nbytes of the tensor are read for the last time."""
        end = self.start + nbytes
        end = -(-end // mmap.PAGESIZE) * mmap.PAGESIZE if final else end - end % mmap.PAGESIZE
        if end - self.done >= (1 if final else self.STEP):
            drop_resident(self.done, end - self.done)
            self.done = end


def owns_mapping(reader: TensorReader) -> bool:
    """Whether the reader's tensors are mappings of their own, whose pages can be handed back."""
    return reader.private_mappings


def consumed(t: torch.Tensor | None, release: bool) -> _Consumed | None:
    """A tracker handing t's pages back as a chunked pass reads them, or None when it must not."""
    if not release or not can_drop() or t is None or t.numel() == 0 or not t.is_contiguous():
        return None
    return _Consumed(t)


def _largest(t: torch.Tensor) -> float:
    """max |value|; NaN if the tensor holds a NaN, inf if an inf (aminmax propagates both)."""
    if t.numel() == 0:
        return 0.0
    lo, hi = (float(v) for v in torch.aminmax(t))
    return math.nan if math.isnan(lo) or math.isnan(hi) else max(-lo, hi)


def _single_rounding(a: torch.dtype, b: torch.dtype, out: torch.dtype) -> bool:
    """Whether torch.add(a, b, out=o) equals the float32 sum of a and b cast to out.

    torch computes in the promoted dtype: float32 itself (then casts to out), or a 16-bit type it
    computes in float and rounds once. Rounding a float32 sum to float16/bfloat16 gives the same as
    rounding the exact sum (float32 carries more than 2p + 2 bits for p = 11 or 8), so when the
    promoted type is the output type both are the correctly rounded sum. Other mixes (bfloat16 +
    bfloat16 into float16: two roundings; float64) take the explicit float32 path.
    """
    promoted = torch.promote_types(a, b)
    return promoted == torch.float32 or (promoted == out and out in (torch.float16, torch.bfloat16))


def _combine(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, subtract: bool) -> None:
    """out = a ± b: the float32 result rounded once to out's dtype."""
    if _single_rounding(a.dtype, b.dtype, out.dtype):
        (torch.sub if subtract else torch.add)(a, b, out=out)
    else:
        work = a.to(torch.float32, copy=True)
        work.sub_(b) if subtract else work.add_(b)
        out.copy_(work)


def _fill(name: str, a: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor, subtract: bool,
          labels: tuple[str, str], what: str, release_inputs: bool = False) -> None:
    """out = a ± b on b's rows, a as it is on the rest, chunk by chunk; NaN/inf named and explained.
    With `release_inputs`, a and b own private file mappings whose pages go back as they are read."""
    x, o = _as_rows(a), _as_rows(out)
    y = _as_rows(b) if b is not None else None
    nb = y.shape[0] if y is not None else 0
    # (pages handed back, bytes of a row, rows it has): each input is read once, in row order
    inputs = [(c, t.shape[1] * t.element_size(), t.shape[0])
              for c, t in ((consumed(a, release_inputs), x), (consumed(b, release_inputs), y)) if c is not None]
    for r0, r1 in _row_chunks(x.shape[0], x.shape[1]):
        k = max(0, min(r1, nb) - r0)
        if k:
            _combine(x[r0:r0 + k], y[r0:r0 + k], o[r0:r0 + k], subtract)
        if r0 + k < r1:
            o[r0 + k:r1].copy_(x[r0 + k:r1])
        if not math.isfinite(_largest(o[r0:r1])):  # NaN/inf in an input propagate to the output
            _explain(name, x[r0:r1], y[r0:r0 + k] if k else None, o[r0:r1], subtract, labels, what)
        for c, row, rows in inputs:
            c.upto(min(r1, rows) * row)
    for c, _, _ in inputs:
        c.upto(c.end - c.start, final=True)


def _explain(name: str, x: torch.Tensor, y: torch.Tensor | None, o: torch.Tensor, subtract: bool,
             labels: tuple[str, str], what: str) -> None:
    for label, part in ((labels[0], x), (labels[1], y)):
        if part is not None and not math.isfinite(_largest(part)):
            bad = int((~torch.isfinite(part)).sum())
            raise NonFiniteError(f"tensor '{name}': the {label} holds {bad} NaN or inf values")
    exact = x.float()
    if y is not None:
        exact[:y.shape[0]] += -y.float() if subtract else y.float()
    bad = int((~torch.isfinite(o)).sum())
    limit = torch.finfo(o.dtype).max
    raise NonFiniteError(
        f"tensor '{name}': {bad} values of the {what} overflow {dtype_name(o.dtype)} (largest |value| "
        f"{_largest(exact):.4g}, {dtype_name(o.dtype)} holds up to {limit:.4g}); choose --dtype bfloat16 or float32")


def add_delta(name: str, delta: torch.Tensor, base: torch.Tensor | None, out_dtype: torch.dtype,
              out: torch.Tensor | None = None, release_inputs: bool = False) -> torch.Tensor:
    """delta + base on the base's rows, delta as it is on the rest; float32 sums cast to out_dtype
    (into `out` when given: delta's shape, out_dtype). `release_inputs`: both inputs are private
    file mappings of their own (SafetensorsReader.get), read for the last time here; their pages
    are handed back as the pass moves on (see _Consumed)."""
    if out is None:
        out = torch.empty(delta.shape, dtype=out_dtype)
    _fill(name, delta, base, out, False, ("delta", "base"), "result", release_inputs)
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _differing(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many elements differ bit for bit (integer views: -0.0 and +0.0 differ too)."""
    diff = _bits(a) - _bits(b)  # wraps, but is 0 exactly where the bits agree
    lo, hi = torch.aminmax(diff)
    if int(lo) == 0 and int(hi) == 0:
        return 0
    return int(torch.count_nonzero(diff))


@dataclass
class RoundTrip:
    """How well base + stored delta reproduces the target, per tensor or summed."""

    elements: int = 0
    inexact: int = 0  # values that differ
    max_abs_error: float = 0.0
    signed_zeros: int = 0  # -0.0 reproduced as +0.0

    def add(self, other: "RoundTrip") -> None:
        self.elements += other.elements
        self.inexact += other.inexact
        self.max_abs_error = max(self.max_abs_error, other.max_abs_error)
        self.signed_zeros += other.signed_zeros


def subtract_base(name: str, target: torch.Tensor, base: torch.Tensor | None,
                  store_dtype: torch.dtype) -> tuple[torch.Tensor, RoundTrip]:
    """target - base on the base's rows, target as it is on the rest, stored as store_dtype.

    Also replays apply-delta on the stored values (`add_delta` into the target's dtype) and counts
    the elements it would not reproduce.
    """
    delta = torch.empty(target.shape, dtype=store_dtype)
    _fill(name, target, base, delta, True, ("target", "base"), "delta")
    replay, t = _as_rows(add_delta(name, delta, base, target.dtype)), _as_rows(target)
    trip = RoundTrip(elements=target.numel())
    for r0, r1 in _row_chunks(t.shape[0], t.shape[1]):
        differing = _differing(replay[r0:r1], t[r0:r1])
        if differing:
            error = replay[r0:r1].float() - t[r0:r1].float()
            inexact = int(torch.count_nonzero(error))
            # The rest differ only in the sign of zero: a target -0.0 comes back as +0.0, since
            # x + (-x) is +0 in IEEE arithmetic whatever delta is stored (numerically identical).
            trip.signed_zeros += differing - inexact
            if inexact:
                trip.inexact += inexact
                trip.max_abs_error = max(trip.max_abs_error, _largest(error))
    return delta, trip
