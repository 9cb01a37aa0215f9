"""Writing a GGUF plan: header, metadata and tensor infos first (from the plan's shapes and types),
then tensor data one tensor at a time, so at most one source tensor is in memory.

gguf-py's GGUFWriter lays out the header, key/values and tensor-info table (and the split keys of
multi-file outputs); its usual `add_tensor` path keeps every tensor until the end, so we declare
tensors with `add_tensor_info` and stream the data ourselves, aligned exactly as it would be.
Tensors whose bytes do not change (same encoding, no permutation) are copied file to file by the
kernel (copy_file_range) without passing through memory.
Writes go through ordinary file objects so a full disk surfaces as ENOSPC/EFBIG, mapped to
DiskFullError; the atomic output removes the partial file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from ..console import info, progress
from ..errors import DiskFullError, OutputError
from ..io.finite import all_finite, cast_into, check_finite, check_result
from ..io.hashing import FileHasher
from ..io.output import ArtifactDir
from ..io.pool import BufferPool, parallel_map, scratch
from ..io.writer import copy_range
from . import cquant
from .metadata import KV, add_all, provenance_kv, source_digest

if TYPE_CHECKING:  # the plan calls into this module; no import back at run time
    from .plan import GGUFPlan, GGUFTensor

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def reverse_rotary_permutation(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face orders each head's rotary rows as two halves (all first elements of the pairs,
    then all second ones); Meta's original and llama.cpp interleave the pairs. Undo HF's order."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# Values per encoding task: its float32 rows and q8_0's scratch (2 x 2 MiB) stay near the core,
# and the ~25 torch calls a task makes (GIL held) are a small share of its time.
TASK_VALUES = 512 * 2**10
# Values per part handed to `done` (a few MiB of output: the write of one overlaps the next's making).
SEGMENT_VALUES = 8 * 2**20
_FLOATS = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}


def encode(t: torch.Tensor, qtype: Q, threads: int | None = None) -> np.ndarray:
    """A tensor in GGUF's encoding of qtype, as a numpy array whose bytes are the file's bytes."""
    return encode_checked(t, qtype, threads)[0]


def encode_checked(t: torch.Tensor, qtype: Q, threads: int | None = None, pool: BufferPool | None = None,
                   done: Callable[[np.ndarray], None] | None = None) -> tuple[np.ndarray, bool]:
    """`encode`, into a buffer of `pool` when given, with the NaN/inf scan done on the way: returns
    the encoding and True when t is certainly finite (False: the caller scans t to say what is not).
    `done`, when given, is called with consecutive parts of the encoding, in order, as each is
    finished (quantized types: every SEGMENT_VALUES values), so that they can be written while
    the next are made; the parts are views of the returned array.

    Quantized types are made in tasks of a few rows on every core: each converts its rows to
    float32 in a reused per-thread buffer (no fresh memory per chunk) and encodes them while they
    are in cache, q8_0 by `cquant.q8_0_rows`, the other direct types by ggml's C rows (gguf-py's
    where llama-cpp-python is absent). Float types are a cast (`cast_into`: round-to-nearest-even,
    bit for bit torch's `.to()`, as gguf-py's BF16 quantizer)."""
    def buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return pool.empty(shape, dtype) if pool is not None else torch.empty(shape, dtype=dtype)

    if qtype in _FLOATS:
        dtype = _FLOATS[qtype]
        if t.dtype == dtype:
            res, finite = t.contiguous(), all_finite(t)
        else:
            res = buffer(tuple(t.shape), dtype)
            finite = cast_into(t, res, threads)
        arr = (res.view(torch.int16) if dtype == torch.bfloat16 else res).numpy()
        if done is not None:
            done(arr)
        return arr, finite
    cols = t.shape[-1]
    rows = t.numel() // cols
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    flat = t.reshape(rows, cols)
    out = buffer((rows, cols // block * type_size), torch.uint8)
    step = max(1, TASK_VALUES // cols)
    errors = np.geterr()

    def task(r: int) -> bool:
        n = min(step, rows - r)
        x = scratch("encode", n * cols, torch.float32).view(n, cols)
        x.copy_(flat[r: r + n])
        dst = out[r: r + n]
        if qtype == Q.Q8_0 and cquant.q8_0_rows(x, dst, scratch("q8_0", n * cols, torch.float32)):
            return True
        finite = all_finite(x)
        rows_np, dst_np = x.numpy(), dst.numpy()
        if not cquant.quantize(rows_np, qtype, dst_np, threads=1):  # ggml's C rows, else gguf-py's
            with np.errstate(**errors):  # the caller's numpy error handling (it is per thread)
                dst_np[:] = gguf.quants.quantize(rows_np, qtype)
        return finite

    finite = True
    segment = max(1, SEGMENT_VALUES // (step * cols)) * step
    for s in range(0, rows, segment):
        e = min(rows, s + segment)
        finite = all(parallel_map(task, range(s, e, step), threads)) and finite
        if done is not None:
            done(out[s:e].numpy())
    return out.numpy(), finite


def produce(plan: GGUFPlan, t: GGUFTensor, pool: BufferPool | None = None,
            done: Callable[[np.ndarray], None] | None = None) -> np.ndarray:
    """Read one source tensor, transform it, encode it (into `pool`'s buffer when given, handing
    finished parts to `done`, see `encode_checked`); checks the byte count against the plan, and
    refuses NaN/inf in the source (or float16 overflow) unless `plan.allow_nonfinite`. Parts may
    have been handed on before a refusal: the caller's output is then discarded."""
    allow = plan.allow_nonfinite
    file = plan.reader.info(t.source).file
    if t.stack:  # routed experts: one layer's experts of a role, stacked (expert-major)
        parts = [plan.reader.get(name) for name in t.stack]
        for name, part in zip(t.stack, parts):
            check_finite(name, part, plan.reader.info(name).file, allow)
        data = torch.stack(parts)
        del parts
    else:
        data = plan.reader.get(t.source)
    if tuple(data.shape) != t.shape:
        raise OutputError(f"{t.source}: shape {tuple(data.shape)} differs from the plan's {t.shape}")
    if t.permute_heads:
        data = reverse_rotary_permutation(data, t.permute_heads)
    arr, finite = encode_checked(data, t.qtype, plan.threads, pool, done)
    if not finite:  # the scan on the way saw NaN/inf (or may have): name them, or the overflow
        check_finite(t.source, data, file, allow)
        if t.qtype == Q.F16 and data.dtype != torch.float16:  # values beyond ±65504 became inf
            check_result(t.source, torch.from_numpy(arr), [(file, data)], allow)
    if arr.nbytes != t.nbytes:
        raise OutputError(f"{t.name}: encoded {arr.nbytes} bytes, the plan says {t.nbytes}")
    return arr


_SAME_BYTES = {(Q.F32, torch.float32), (Q.F16, torch.float16), (Q.BF16, torch.bfloat16)}


def passthrough(plan: GGUFPlan, t: GGUFTensor) -> tuple[Path, int] | None:
    """(file, offset) of source bytes that already are the output's bytes (same encoding, no
    permutation): those are copied file to file in the kernel, as cp does. The copy never reads
    them, so unless `plan.allow_nonfinite` they are scanned for NaN/inf first, in their mapping
    (no copy; the kernel then copies pages the scan brought into the page cache)."""
    info = plan.reader.info(t.source)
    if t.permute_heads or t.stack or (t.qtype, info.dtype) not in _SAME_BYTES:
        return None
    src = plan.reader.byte_range(t.source)
    if src is not None and not plan.allow_nonfinite:
        check_finite(t.source, plan.reader.view(t.source), info.file)
    return src


def _copy_into(fout, src: tuple[Path, int], nbytes: int) -> bool:
    """Append nbytes of src to fout with copy_file_range; False where the kernel cannot."""
    fout.flush()
    pos = fout.tell()
    try:
        with open(src[0], "rb") as f:
            copy_range(f.fileno(), src[1], fout.fileno(), pos, nbytes)
    except OSError as e:
        if e.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            return False
        raise
    fout.seek(pos + nbytes)
    return True


class _Writer(gguf.GGUFWriter):
    """GGUFWriter writing to the paths we choose (atomic temp files), not names it derives."""

    def __init__(self, paths: list[Path], arch: str, split_max_size: int):
        super().__init__(None, arch, split_max_size=split_max_size)
        self._paths = paths

    def format_shard_names(self, path: Path) -> list[Path]:
        return list(self._paths)

    def _pack_val(self, val, vtype, add_vtype: bool, sub_type=None) -> bytes:
        """gguf-py's packing, with a flat array packed in one go: its item-by-item path takes
        ~20 µs a token, most of a second for a 32,000-token vocabulary. Same bytes: the items
        one after the other, little-endian, no padding; anything else is left to gguf-py."""
        V = gguf.GGUFValueType
        if (vtype is not V.ARRAY or not isinstance(val, (list, tuple)) or not val
                or self.endianess is not gguf.GGUFEndian.LITTLE or len({type(v) for v in val}) != 1):
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        ltype = sub_type if sub_type is not None else V.get_type(val[0])
        fmt = self._simple_value_packing.get(ltype)
        if ltype is V.STRING:
            encoded = [v.encode("utf-8") if isinstance(v, str) else v for v in val]
            body = b"".join(struct.pack("<Q", len(e)) + e for e in encoded)
        elif fmt is not None:
            body = struct.pack(f"<{len(val)}{fmt}", *val)
        else:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        return (struct.pack("<I", vtype) if add_vtype else b"") + struct.pack("<IQ", ltype, len(val)) + body


class _Appender:
    """Appends encoded parts to a file on a thread of its own, in order, telling the file's hasher
    about each: the main thread's write of a part would otherwise leave the encoding workers'
    cores idle, and the hasher could only start once a whole tensor was written."""

    def __init__(self):
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="xquant-append")
        self._pending: list[Future] = []

    def append(self, fout, hasher: FileHasher, part: np.ndarray) -> None:
        self._pending.append(self._thread.submit(self._write, fout, hasher, part))

    @staticmethod
    def _write(fout, hasher: FileHasher, part: np.ndarray) -> None:
        begin = fout.tell()
        fout.write(memoryview(part).cast("B"))
        fout.flush()
        hasher.finished(begin, fout.tell())

    def wait(self) -> None:
        """Once every part appended so far is written; raises the first write's error."""
        pending, self._pending = self._pending, []
        errors = [f.exception() for f in pending]
        for e in errors:
            if e is not None:
                raise e

    def close(self) -> None:
        self._thread.shutdown(wait=True)


def _pad(fout, alignment: int) -> None:
    if pad := -fout.tell() % alignment:
        fout.write(bytes(pad))


@contextlib.contextmanager
def disk_full_as_error(where: Path) -> Iterator[None]:
    """ENOSPC / EDQUOT / EFBIG (file size limit) -> DiskFullError naming the output."""
    try:
        yield
    except OSError as e:
        if e.errno in FULL_ERRNOS:
            raise DiskFullError(f"{where}: disk full while writing ({os.strerror(e.errno)})") from None
        raise


def write_stage(plan: GGUFPlan, paths: list[Path], extra_kv: list[KV]) -> dict[Path, str]:
    """Write the plan's tensors (at its stage type) into paths: one per shard, in order.

    Returns each file's sha256, computed on one thread per file while it is written (the file is
    written front to back, so the hasher follows its flushed end)."""
    shards = plan.shards()
    if len(shards) != len(paths):
        raise OutputError(f"{paths[0]}: {len(paths)} paths for {len(shards)} shards")
    writer = _Writer(paths, plan.gguf_arch, plan.split_max_size)
    for t in plan.tensors:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    if len(writer.tensors) != len(shards):  # gguf-py split the same list differently: a bug here
        raise OutputError(f"{paths[0]}: gguf-py planned {len(writer.tensors)} shards, xquant {len(shards)}")
    add_all(writer, plan.kv + extra_kv)
    plan.vocab.add_to(writer)
    hashers: list[FileHasher] = []
    read_fds: list[int] = []
    appender = _Appender()
    try:
        writer.write_header_to_file(path=paths[0])
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        assert writer.fout is not None
        for fout, path in zip(writer.fout, paths):  # each shard's header, kv and tensor infos are written by now
            fout.flush()
            read_fds.append(os.open(path, os.O_RDONLY))  # gguf-py's file is write-only: no mapping
            hashers.append(FileHasher(read_fds[-1]))
            hashers[-1].finished(0, fout.tell())
        layer, kernel_copy = None, True
        # One output buffer for every encoded tensor (written before the next is made): its
        # pages are touched once per run, not once per tensor.
        pool = BufferPool(max((t.nbytes for t in plan.tensors), default=0), count=1)
        with progress(f"writing {plan.stage.name} GGUF", total=len(plan.tensors)) as advance:
            for fout, hasher, shard in zip(writer.fout, hashers, shards):
                for t in shard:
                    if t.layer != layer:  # free pickle mappings of the previous layer
                        plan.reader.release()
                        layer = t.layer
                    begin = fout.tell()
                    _pad(fout, writer.data_alignment)
                    src = passthrough(plan, t) if kernel_copy else None
                    if src is None or not _copy_into(fout, src, t.nbytes):
                        kernel_copy = kernel_copy and src is None
                        fout.flush()
                        hasher.finished(begin, fout.tell())  # the padding
                        try:
                            arr = produce(plan, t, pool, lambda part: appender.append(fout, hasher, part))
                        finally:
                            appender.wait()  # written: the buffer is free again (or failed: stop)
                        pool.recycle(torch.from_numpy(arr))
                        del arr
                        begin = fout.tell()
                    fout.flush()
                    hasher.finished(begin, fout.tell())
                    advance()
                begin = fout.tell()
                _pad(fout, writer.data_alignment)
                fout.flush()
                hasher.finished(begin, fout.tell())
        digests = {path: hasher.digest(fout.tell()) for path, fout, hasher in zip(paths, writer.fout, hashers)}
        hashers = []
        return digests
    finally:
        appender.close()
        for hasher in hashers:  # only after a failure: they were emptied once digested
            hasher.cancel()
        for fd in read_fds:
            os.close(fd)
        plan.reader.release()
        writer.close()


@dataclass
class GGUFResult:
    paths: list[Path]
    outtype: str
    bytes: int
    tensors: int
    imatrix_entries: int = 0


def _split_paths(prefix: Path, n: int) -> list[Path]:
    """llama.cpp's names for prefix: prefix.gguf, or prefix-00001-of-0000N.gguf... (its loader and
    its quantizer's keep_split use this convention)."""
    if n == 1:
        return [prefix.with_name(prefix.name + ".gguf")]
    return [prefix.with_name(f"{prefix.name}-{i + 1:05d}-of-{n:05d}.gguf") for i in range(n)]


def prepare(plan: GGUFPlan) -> None:
    """Before any output is opened: the importance matrix (read, or computed from calibration
    text), checked against the plan, and recorded in the provenance."""
    from . import imatrix as im

    matrix = None
    if plan.imatrix_file is not None:
        matrix = im.Imatrix.load(plan.imatrix_file)
    elif plan.calibration:
        matrix = im.compute_imatrix(plan, threads=plan.threads)
    if matrix is not None:
        matrix.check(plan)
        plan.provenance.options["imatrix"] = matrix.describe()
    plan.matrix = matrix


def write(plan: GGUFPlan, handles: list[ArtifactDir]) -> None:
    """Write the plan's outputs into the executor's temporary files (in `plan.outputs()` order:
    the importance matrix when one is saved, then the GGUF file or its splits)."""
    if plan.imatrix_out is not None:
        imatrix_handle, *handles = handles
        with disk_full_as_error(plan.imatrix_out):
            plan.matrix.save(imatrix_handle.path)
    outs = plan.output_paths()
    info("hashing the inputs (cached) for the provenance keys")
    extra = provenance_kv("gguf", plan.provenance.options, source_digest(plan.provenance.input_records()))
    tmps = [h.path for h in handles]
    if not plan.outtype.by_llama_cpp and plan.stage is plan.outtype:
        with disk_full_as_error(outs[0]):
            digests = write_stage(plan, tmps, extra)
        for h in handles:
            h.hashes[h.path.name] = digests[h.path]
    else:
        with contextlib.ExitStack() as stack:
            _write_via_llama_cpp(plan, outs, tmps, extra, plan.matrix, plan.threads, stack)


def _write_via_llama_cpp(plan: GGUFPlan, outs: list[Path], tmps: list[Path], extra: list[KV], matrix,
                         threads: int | None, stack: contextlib.ExitStack) -> None:
    """Write the unquantized stage beside the output, quantize it with llama.cpp into the temp
    files, and remove the stage whatever happens."""
    from . import kquant

    kquant.require()  # fail before writing gigabytes
    n = len(tmps)
    stage = _split_paths(plan.out.parent / f".{plan.out.stem}.xquant-stage", n)
    quant_prefix = plan.out.parent / f".{plan.out.stem}.xquant-quant"
    quant = _split_paths(quant_prefix, n)
    stack.callback(lambda: [p.unlink(missing_ok=True) for p in stage + quant])
    with disk_full_as_error(outs[0]):
        write_stage(plan, stage, extra)
    pure = plan.outtype.direct is not None  # q4_0 & co.: same layout as when written directly
    with disk_full_as_error(outs[0]):  # keep_split: llama.cpp names the files from a prefix
        kquant.quantize(stage[0], quant_prefix if n > 1 else quant[0], plan.outtype, matrix, keep_split=n > 1,
                        pure=pure, threads=threads, expected_files=quant)
    for src, dst in zip(quant, tmps):
        os.replace(src, dst)
