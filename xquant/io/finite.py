"""The one rule for NaN and inf in weights: refused, naming the file and the tensor.

A NaN or inf weight is a damaged checkpoint (a failed training step, a bad merge, a broken
conversion); copied through, it turns every logit of the model into NaN (and quantized, one inf
spreads over a whole block: q8_0 writes 32 NaN for it). Every command checks each tensor where it
produces it, with `check_finite`; an explicit option (`allow_nonfinite` in a plan) lets them through.

The scan is one `aminmax` pass (NaN and inf propagate to the extremes; on CPU ~20x faster than
`torch.isfinite`, and it allocates nothing); the count of bad values is only taken once one is found.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import torch

from ..errors import InputError
from .dtypes import dtype_name

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
    import mmap

    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    item = torch.empty((), dtype=dtype).element_size()
    bad = None
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), nbytes + offset - start, access=mmap.ACCESS_COPY, offset=start)
        try:
            view = memoryview(m)[offset - start: offset - start + nbytes]
            t = torch.frombuffer(view, dtype=dtype, count=nbytes // item)
            if not all_finite(t):
                bad = t.clone()  # only on failure: to name the values once the mapping is gone
            del t
            view.release()
        finally:
            m.close()
    if bad is not None:
        check_finite(name, bad, path)
