"""The one rule for NaN and inf in weights: refused, naming the file and the tensor.

A NaN or inf weight is a damaged checkpoint (a failed training step, a bad merge, a broken
conversion); copied through, it turns every logit of the model into NaN (and quantized, one inf
spreads over a whole block: q8_0 writes 32 NaN for it). Every command checks each tensor where it
produces it, with `check_finite`; an explicit option (`allow_nonfinite` in a plan) lets them through.

The scan is one `aminmax` pass (NaN and inf propagate to the extremes; on CPU ~20x faster than
`torch.isfinite`, and it allocates nothing); the count of bad values is only taken once one is found.
A cast (`cast_into`, `cast_file_into`) scans each block it makes while the block is in cache,
so a cast tensor is never read a second time for the check.
"""

from __future__ import annotations

import math
import mmap
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import torch

from ..errors import InputError
from .dtypes import dtype_name
from .pool import parallel_map, scratch

R = TypeVar("R")

# aminmax covers these; other dtypes (integers, bool, float8) hold no inf to find.
_SCANNED = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class NonFiniteError(InputError):
    """An input holds NaN/inf, or a result does not fit the requested dtype."""


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of t is finite (True for non-float dtypes and empty tensors)."""
    if t.dtype not in _SCANNED or t.numel() == 0:
        return True
    lo, hi = (float(v) for v in torch.aminmax(t.reshape(-1)))
    return math.isfinite(lo) and math.isfinite(hi)


def _describe(t: torch.Tensor) -> str:
    flat = t.reshape(-1)
    nan = int(torch.isnan(flat).sum())
    inf = int(torch.isinf(flat).sum())
    first = int((~torch.isfinite(flat)).nonzero()[0, 0])
    index = []
    for size in reversed(t.shape):
        first, i = divmod(first, size)
        index.append(i)
    parts = [f"{nan} NaN" if nan else "", f"{inf} inf" if inf else ""]
    noun = "value" if nan + inf == 1 else "values"
    return f"{' and '.join(p for p in parts if p)} {noun} (the first at {list(reversed(index))})"


def check_finite(name: str, tensor: torch.Tensor, file: Path | str, allow: bool = False) -> None:
    """Raise NonFiniteError naming file and tensor when `tensor` holds NaN or inf (unless `allow`)."""
    if allow or all_finite(tensor):
        return
    raise NonFiniteError(f"{file}: tensor '{name}' holds {_describe(tensor)}; NaN/inf weights are refused")


def check_result(name: str, result: torch.Tensor, sources: Iterable[tuple[Path | str, torch.Tensor]],
                 allow: bool = False) -> None:
    """Check a tensor made from `sources` (cast, concatenated): one pass over the result in the usual
    case; on NaN/inf, the source holding them is named, or else the overflow of the result's dtype."""
    if allow or all_finite(result):
        return
    sources = list(sources)
    for file, t in sources:
        check_finite(name, t, file)
    largest = max(float(t.abs().max()) for _, t in sources if t.numel())
    limit = torch.finfo(result.dtype).max
    raise NonFiniteError(f"{sources[0][0]}: tensor '{name}' has values beyond {dtype_name(result.dtype)}'s range "
                         f"(largest |value| {largest:.4g}, {dtype_name(result.dtype)} holds up to {limit:.4g}); "
                         f"choose another dtype (bfloat16 or float32)")


def check_file_range(name: str, path: Path, offset: int, nbytes: int, dtype: torch.dtype, allow: bool = False) -> None:
    """check_finite over tensor bytes that stay in a file (a pass-through copy), through a mapping of
    just that range, unmapped at once: the scan reads the page cache in place (no copy) and its
    pages do not stay resident in the process."""
    if allow or dtype not in _SCANNED or nbytes == 0:
        return
    item = dtype.itemsize
    # only on failure a copy: to name the values once the mapping is gone
    bad = _with_mapping(path, offset, nbytes // item, dtype, lambda t: None if all_finite(t) else t.clone())
    if bad is not None:
        check_finite(name, bad, path)


def _with_mapping(path: Path, offset: int, count: int, dtype: torch.dtype, fn: Callable[[torch.Tensor], R]) -> R:
    """fn(the `count` values of `dtype` at `offset` in `path`), read through a private mapping of
    just that range, unmapped when fn returns: page-cache pages read in place, not left resident."""
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    nbytes = count * dtype.itemsize
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), nbytes + offset - start, access=mmap.ACCESS_COPY, offset=start)
    view = memoryview(m)[offset - start: offset - start + nbytes]
    try:
        t = torch.frombuffer(view, dtype=dtype, count=count)
        result = fn(t)
        del t
        return result
    finally:
        try:
            view.release()
            m.close()
        except BufferError:  # a traceback still holds the tensor: the mapping goes with it
            pass


# Casts are cut into tasks of TASK values (one file window each), and a task into blocks of
# BLOCK values whose source, float32 staging and result stay in a core's cache (2 MiB of L2
# here) while they are cast and then scanned for NaN/inf.
TASK = 4 * 2**20
BLOCK = 256 * 2**10
_HALF = (torch.float16, torch.bfloat16)


def _cast_span(src: torch.Tensor, out: torch.Tensor) -> bool:
    """out = src cast to out's dtype (flat, same length). Returns True when every value of out is
    finite; False when one may not be (the caller redoes the cast whole and scans it again).

    float16 <-> bfloat16 goes through float32: torch's direct cast between them is scalar (~1.3 ns
    a value here), its two steps through float32 are vectorized (~0.4 ns together). The first step
    is exact, so the one rounding is the direct cast's; only NaN bits differ (0xFFFF against
    0x7FC0), and a span holding NaN or inf is reported, for the caller to redo with the direct cast.
    The scan is a float32 sum where the values are float32 (NaN and inf propagate through it; a
    sum that overflows only reports a false alarm), ~8x cheaper than aminmax over halves."""
    staged = src.dtype in _HALF and out.dtype in _HALF and src.dtype != out.dtype
    narrowing = torch.finfo(out.dtype).max < torch.finfo(src.dtype).max  # the cast itself can make inf
    for b in range(0, src.numel(), BLOCK):
        e = min(b + BLOCK, src.numel())
        if staged:
            f32 = scratch("cast", e - b, torch.float32)
            f32.copy_(src[b:e])
            out[b:e].copy_(f32)
            finite = math.isfinite(float(f32.sum())) and (not narrowing or all_finite(out[b:e]))
        else:
            out[b:e].copy_(src[b:e])
            finite = math.isfinite(float(out[b:e].sum())) if out.dtype == torch.float32 else all_finite(out[b:e])
        if not finite:  # the caller redoes the whole tensor
            return False
    return True


def cast_into(src: torch.Tensor, out: torch.Tensor, threads: int | None = None) -> bool:
    """out[...] = src.to(out.dtype), bit for bit, in blocks spread over the cores (a cast runs on one
    core in torch), each block scanned for NaN/inf while it is in cache. Returns True when every
    value of out is finite. False means one may not be: src holds NaN/inf, the cast overflowed, or
    (rarely) a scan's sum overflowed; `check_result` then scans again and says which. out must be
    contiguous, of src's shape."""
    if tuple(src.shape) != tuple(out.shape) or not out.is_contiguous():
        raise ValueError(f"cast_into: {list(src.shape)} into {list(out.shape)} (contiguous: {out.is_contiguous()})")
    flat_src, flat_out = src.reshape(-1), out.view(-1)
    n = flat_src.numel()
    spans = range(0, n, TASK)
    finite = all(parallel_map(lambda b: _cast_span(flat_src[b: b + TASK], flat_out[b: b + TASK]), spans, threads))
    if not finite:  # rare (refused unless allowed): the whole tensor by the direct cast, NaN bits as .to() gives them
        out.copy_(src)
    return finite


def cast_file_into(path: Path, offset: int, dtype: torch.dtype, out: torch.Tensor, threads: int | None = None) -> bool:
    """cast_into from a tensor's bytes in a file (`dtype` values at `offset`, as many as out holds),
    each task reading through a mapping of just its window: no copy of the source, and at most a
    few windows of it resident, whatever the tensor's size."""
    if not out.is_contiguous():
        raise ValueError("cast_file_into: the output must be contiguous")
    flat_out, n, item = out.view(-1), out.numel(), dtype.itemsize

    def task(b: int) -> bool:
        e = min(b + TASK, n)
        return _with_mapping(path, offset + b * item, e - b, dtype, lambda s: _cast_span(s, flat_out[b:e]))

    finite = all(parallel_map(task, range(0, n, TASK), threads))
    if not finite:
        _with_mapping(path, offset, n, dtype, flat_out.copy_)
    return finite
