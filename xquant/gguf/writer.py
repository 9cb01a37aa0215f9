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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from ..console import info, progress
from ..errors import DiskFullError, OutputError
from ..io.finite import check_finite, check_result
from ..io.hashing import FileHasher
from ..io.output import ArtifactDir
from ..io.writer import copy_range
from . import cquant
from .metadata import KV, add_all, provenance_kv, source_digest
from .outtypes import CHUNK_VALUES

if TYPE_CHECKING:  # the plan calls into this module; no import back at run time
    from .plan import GGUFPlan, GGUFTensor

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def reverse_rotary_permutation(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face orders each head's rotary rows as two halves (all first elements of the pairs,
    then all second ones); Meta's original and llama.cpp interleave the pairs. Undo HF's order."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def encode(t: torch.Tensor, qtype: Q, threads: int | None = None) -> np.ndarray:
    """A tensor in GGUF's encoding of qtype, as a numpy array whose bytes are the file's bytes."""
    if qtype == Q.F32:
        return t.to(torch.float32).contiguous().numpy()
    if qtype == Q.F16:
        return t.to(torch.float16).contiguous().numpy()
    if qtype == Q.BF16:  # round-to-nearest-even, as gguf-py's BF16 quantizer
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    cols = t.shape[-1]
    rows = t.numel() // cols
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    flat = t.reshape(rows, cols)
    out = np.empty((rows, cols // block * type_size), dtype=np.uint8)
    step = max(1, CHUNK_VALUES // cols)
    for r in range(0, rows, step):  # chunks bound the quantizer's float temporaries
        chunk = flat[r: r + step].to(torch.float32).contiguous().numpy()
        if not cquant.quantize(chunk, qtype, out[r: r + step], threads):  # ggml's C rows, else gguf-py's
            out[r: r + step] = gguf.quants.quantize(chunk, qtype)
    return out


def produce(plan: GGUFPlan, t: GGUFTensor) -> np.ndarray:
    """Read one source tensor, transform it, encode it; checks the byte count against the plan, and
    refuses NaN/inf in the source (or float16 overflow) unless `plan.allow_nonfinite`."""
    allow = plan.allow_nonfinite
    if t.stack:  # routed experts: one layer's experts of a role, stacked (expert-major)
        parts = [plan.reader.get(name) for name in t.stack]
        for name, part in zip(t.stack, parts):
            check_finite(name, part, plan.reader.info(name).file, allow)
        data = torch.stack(parts)
        del parts
    else:
        data = plan.reader.get(t.source)
        check_finite(t.source, data, plan.reader.info(t.source).file, allow)
    if tuple(data.shape) != t.shape:
        raise OutputError(f"{t.source}: shape {tuple(data.shape)} differs from the plan's {t.shape}")
    if t.permute_heads:
        data = reverse_rotary_permutation(data, t.permute_heads)
    arr = encode(data, t.qtype, plan.threads)
    if t.qtype == Q.F16 and data.dtype != torch.float16:  # values beyond ±65504 become inf
        check_result(t.source, torch.from_numpy(arr), [(plan.reader.info(t.source).file, data)], allow)
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
                        arr = produce(plan, t)
                        fout.write(memoryview(arr).cast("B"))
                        del arr
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
