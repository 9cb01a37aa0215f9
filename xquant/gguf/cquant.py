"""llama.cpp's own C quantizer for the types xquant writes directly (q8_0, q4_0, q4_1, q5_0, q5_1).

gguf-py's numpy quantizers give the same bytes (both follow ggml-quants.c's reference rows) but
run at about 0.1 GB/s on one core, with a dozen float temporaries per value. ggml's
`ggml_quantize_chunk`, shipped in llama-cpp-python's libggml-base, does the same rows in C; ctypes
releases the GIL during the call, so row chunks run on every core. Where llama-cpp-python is not
installed, `quantize` returns None and the caller uses gguf-py.

q8_0, the type most converted to, has a faster path still: `q8_0_rows` makes ggml's reference
bytes with a few vectorized torch passes (~2 ns a value on one core, against ~7 ns for the C rows
here, which are scalar: a libm roundf per value). It is tested byte for byte against the C rows.
"""

from __future__ import annotations

import ctypes
import functools
import math
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from ..io.pool import cores, parallel_map

# The types ggml quantizes without an importance matrix by its reference rows (k-quants go
# through llama.cpp's model quantizer instead, see kquant.py).
DIRECT = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)
ROWS_PER_TASK = 256


@functools.cache
def _lib() -> ctypes.CDLL | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        if (lib_dir / name).exists():
            lib = ctypes.CDLL(str(lib_dir / name))
            break
    else:
        return None
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


def available() -> bool:
    return _lib() is not None


def quantize(rows: np.ndarray, qtype: Q, out: np.ndarray, threads: int | None = None) -> bool:
    """Quantize float32 `rows` [n, cols] into `out` [n, cols / block * type size] (uint8).
    Returns False (nothing written) when ggml's library is not there or the type is not direct."""
    lib = _lib()
    if lib is None or qtype not in DIRECT:
        return False
    if rows.dtype != np.float32 or not rows.flags.c_contiguous or not out.flags.c_contiguous:
        raise ValueError("quantize takes C-contiguous float32 rows and a C-contiguous output")
    n, cols = rows.shape
    row_bytes = out.shape[1]
    lib.ggml_quantize_init(int(qtype))
    src, dst = rows.ctypes.data, out.ctypes.data

    def task(start: int) -> None:
        count = min(ROWS_PER_TASK, n - start)
        written = lib.ggml_quantize_chunk(int(qtype), src + start * cols * 4, dst + start * row_bytes,
                                          0, count, cols, None)
        if written != count * row_bytes:
            raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {count * row_bytes}")

    starts = list(range(0, n, ROWS_PER_TASK))
    if (threads or cores()) == 1 or len(starts) == 1:
        for s in starts:  # already on a worker (writer.encode_checked's row tasks): no second level
            task(s)
    else:
        parallel_map(task, starts, threads)
    return True


# The largest float32 below 0.5: trunc(y + copysign(_BELOW_HALF, y)) is C's roundf(y) (halves away
# from zero) for every |y| < 2^23. With 0.5 itself, y = 0.5 - 2^-25 would sum to 1 after rounding.
_BELOW_HALF = float(np.nextafter(np.float32(0.5), np.float32(0)))
_ZERO = torch.zeros((), dtype=torch.float32)


def q8_0_rows(x: torch.Tensor, out: torch.Tensor, work: torch.Tensor) -> bool:
    """ggml's reference q8_0 of float32 rows `x` [n, cols] into `out` [n, cols / 32 * 34] (uint8),
    the same bytes as `quantize_row_q8_0_ref`: per block of 32, d = max|x| / 127 (stored as
    float16), q = roundf(x * (1 / d)), or 0 where d is 0. `work` is float32 scratch of x's size.

    Returns False, leaving out unspecified, when a block holds NaN or inf, or its 1 / d overflows
    (a block of float32 subnormals): the C rows' results there are its comparisons' order and its
    float -> int8 conversion of inf, so the caller gives such rows to them."""
    blocks = x.reshape(-1, 32)
    a = torch.abs(blocks, out=work.view(-1, 32))
    amax = a.amax(dim=1, keepdim=True)
    d = amax / 127
    inv = torch.where(d != 0, 1.0 / d, _ZERO)  # a true division, as the C code's 1.0f/d
    # NaN and inf reach the block maxima, an overflowed 1 / d the inverses: either makes the sum
    # non-finite (as a sum that overflows would: then the C rows are merely slower).
    if not math.isfinite(float(amax.sum() + inv.sum())):
        return False
    # |x| * inv, then the half-away rounding with the sign put back; the float -> int8 copy
    # truncates toward zero, which is the trunc of the formula above.
    a.mul_(inv).add_(_BELOW_HALF).copysign_(blocks)
    dst = out.view(-1, 34)
    dst[:, 2:].view(torch.int8).copy_(a)
    dst[:, :2].view(torch.float16).copy_(d)
    return True
