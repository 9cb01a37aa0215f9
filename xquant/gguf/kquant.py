"""k-quants and i-quants by llama.cpp's own quantizer, `llama_model_quantize` via llama-cpp-python.

The extra `xquant[llamacpp]` (llama-cpp-python, which compiles llama.cpp) provides it; without it
these types fail with an error naming the extra. The importance matrix is handed over in memory,
as the `llama_model_imatrix_data` array (name, per-column values, size; NULL-terminated) that
llama.h declares — the same values llama-quantize derives from an imatrix file (sums / counts).

llama.cpp reports a failed write only as "iostream error"; a failure with the filesystem full (or
the file-size limit reached) becomes DiskFullError, and every output file is checked against its
own tensor table afterwards, so a short file never passes as complete.

`load_llama` opens a GGUF for evaluation (tests, runtimes) with the settings that make llama.cpp's
logits comparable and that avoid its AMX crash on some CPUs.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from ..errors import DiskFullError, MissingDependencyError, OutputError
from .outtypes import OutType

if TYPE_CHECKING:
    from .imatrix import Imatrix

EXTRA = "llamacpp"
PACKAGE = "llama-cpp-python"


def require():
    """The llama_cpp module, or MissingDependencyError naming the extra."""
    try:
        import llama_cpp
    except ImportError:
        raise MissingDependencyError(PACKAGE, "GGUF k-quants and i-quants (llama.cpp's quantizer)", EXTRA) from None
    return llama_cpp


@contextlib.contextmanager
def captured_log(llama_cpp) -> Iterator[list[str]]:
    """Route llama.cpp's log into a list for the duration (its quantizer logs every tensor)."""
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data) -> None:
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def _kv_overrides(llama_cpp, values: dict[str, str | int]):
    """llama_model_kv_override[] (terminated by an empty key) recording the imatrix, as llama-quantize does."""
    arr = (llama_cpp.llama_model_kv_override * (len(values) + 1))()
    for item, (key, value) in zip(arr, values.items()):
        item.key = key.encode()[:127]
        if isinstance(value, int):
            item.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            item.value.val_i64 = value
        else:
            item.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
            item.value.val_str = str(value).encode()[:127]
    return arr


def _imatrix_array(llama_cpp, matrix: "Imatrix"):
    """llama_model_imatrix_data[] plus the buffers it points into (kept alive by the caller)."""
    values = matrix.values()
    arr = (llama_cpp.llama_model_imatrix_data * (len(values) + 1))()
    keep = []
    for item, (name, vec) in zip(arr, values.items()):
        buf = (ctypes.c_float * len(vec)).from_buffer_copy(vec.tobytes())
        keep.append(buf)
        item.name = name.encode()
        item.data = ctypes.cast(buf, ctypes.POINTER(ctypes.c_float))
        item.size = len(vec)
    return arr, keep


def _last_error(lines: list[str]) -> str:
    text = "".join(lines)
    for line in reversed(text.splitlines()):
        if "failed to quantize" in line or "error" in line.lower() or "Missing importance" in line:
            return line.split("failed to quantize:")[-1].strip(" :=")
    return "see XQUANT_DEBUG=1"


def quantize(src: Path, dst: Path, outtype: OutType, matrix: "Imatrix | None" = None, *, keep_split: bool = False,
             pure: bool = False, threads: int | None = None, expected_files: list[Path] | None = None) -> None:
    """Quantize the GGUF at src into dst (a prefix when keep_split) with llama.cpp. Whether the type
    needs an importance matrix is checked by the plan; llama.cpp enforces its own rule again."""
    llama_cpp = require()
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(outtype.ftype)
    params.nthread = threads or 0  # 0: llama.cpp uses all hardware threads
    params.keep_split = keep_split
    params.pure = pure
    keep: list = []
    if matrix is not None:
        arr, keep = _imatrix_array(llama_cpp, matrix)
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        overrides = _kv_overrides(llama_cpp, {
            "quantize.imatrix.file": matrix.source,
            "quantize.imatrix.dataset": ", ".join(matrix.datasets),
            "quantize.imatrix.entries_count": len(matrix.entries),
            "quantize.imatrix.chunks_count": matrix.chunk_count,
        })
        params.kv_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_kv_override))
        keep += [arr, overrides]
    with captured_log(llama_cpp) as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    del keep
    if os.environ.get("XQUANT_DEBUG") == "1":
        from ..console import err_console

        err_console.print("".join(log), markup=False, highlight=False)
    if rc != 0:
        where = (expected_files or [dst])
        if any(_out_of_space(p) for p in where):
            raise DiskFullError(f"{dst}: disk full while llama.cpp wrote it ({_last_error(log)})")
        raise OutputError(f"{dst}: llama.cpp failed to quantize to {outtype.name}: {_last_error(log)}")
    for path in expected_files or [dst]:
        check_complete(path)


def _out_of_space(path: Path) -> bool:
    """After a failed write (llama.cpp reports only "iostream error"): is the filesystem full, or
    has the file reached the process's file-size limit?"""
    import resource
    import shutil

    try:
        if shutil.disk_usage(path.parent).free < 1 << 20:
            return True
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        return limit != resource.RLIM_INFINITY and path.exists() and path.stat().st_size >= limit - (1 << 20)
    except OSError:
        return False


def check_complete(path: Path) -> None:
    """The file holds all the tensor data its header promises; a short file means the disk (or
    the file-size limit) ran out while llama.cpp wrote it."""
    from gguf import GGUFReader

    if not path.exists():
        raise OutputError(f"{path}: llama.cpp reported success but wrote no file")
    size = path.stat().st_size
    try:
        reader = GGUFReader(path)
        end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    except (ValueError, OSError, IndexError) as e:
        end = size + 1  # an unreadable header after a failed write: treat as truncated
        if size > 64 * 2**20:  # a long, unreadable file is something else
            raise OutputError(f"{path}: llama.cpp wrote an unreadable GGUF ({e})") from None
    if end > size:
        raise DiskFullError(f"{path}: disk full while llama.cpp wrote it ({size:,} of {end:,} bytes)")


@contextlib.contextmanager
def _no_weight_repacking(llama_cpp) -> Iterator[None]:
    """Load models without llama.cpp's extra CPU buffer types (AMX / repacked weights).

    ggml's AMX matmul segfaults on some Sapphire-Rapids-class machines (llama.cpp issue #20824,
    reproduced here with every quantized type); plain CPU buffers compute the same results.
    llama-cpp-python exposes no switch, so the model defaults are adjusted while loading."""
    low = llama_cpp.llama_cpp
    original = low.llama_model_default_params

    def defaults():
        params = original()
        params.use_extra_bufts = False
        return params

    low.llama_model_default_params = defaults
    try:
        yield
    finally:
        low.llama_model_default_params = original


def load_llama(path: Path, n_ctx: int = 512, f32_cache: bool = False, **kwargs):
    """A llama_cpp.Llama over a GGUF file for evaluation: every position's logits, quiet, no
    weight repacking; f32_cache keeps the KV cache in float32 (llama.cpp's default, f16, adds
    ~1e-3 to the logits, which hides the file's own precision)."""
    llama_cpp = require()
    if f32_cache:
        kwargs.setdefault("type_k", 0)  # GGML_TYPE_F32
        kwargs.setdefault("type_v", 0)
    with _no_weight_repacking(llama_cpp):
        return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, verbose=False, **kwargs)
