"""llama.cpp's own C quantizer for the types xquant writes directly (q8_0, q4_0, q4_1, q5_0, q5_1).

gguf-py's numpy quantizers give the same bytes (both follow ggml-quants.c's reference rows) but
run at about 0.1 GB/s on one core, with a dozen float temporaries per value. ggml's
`ggml_quantize_chunk`, shipped in llama-cpp-python's libggml-base, does the same rows in C; ctypes
releases the GIL during the call, so row chunks run on every core. Where llama-cpp-python is not
installed, `quantize` returns None and the caller uses gguf-py.
"""

from __future__ import annotations

import ctypes
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q

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

    starts = range(0, n, ROWS_PER_TASK)
    workers = max(1, min(threads or os.cpu_count() or 1, len(starts)))
    if workers == 1:
        for s in starts:
            task(s)
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="xquant-quant") as pool:
            list(pool.map(task, starts))
    return True
