"""Size-bounded sharded safetensors writer, laid out from a plan before any tensor arrives.

Shard names and the index follow transformers exactly: `model.safetensors` for a single file,
otherwise `model-00001-of-0000N.safetensors` plus `model.safetensors.index.json` with
`metadata.total_size` and `weight_map`. Because offsets are fixed up front, tensors may arrive in
any order and only the tensor being written is in memory.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DiskFullError, OutputError, ShapeError
from .dtypes import itemsize
from .hashing import FileHasher
from .safetensors_file import layout, pwrite_all, tensor_bytes

INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = itemsize(self.dtype)
        for d in self.shape:
            n *= d
        return n


def assign_shards(specs: list[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Greedy split in the given order: a new shard starts when the next tensor would overflow."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


class _Shard:
    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None):
        self.path = path
        self.specs = {s.name: s for s in specs}
        head, self.offsets = layout([(s.name, s.shape, s.dtype) for s in specs], metadata)
        self.size = len(head) + sum(s.nbytes for s in specs)
        self.written: set[str] = set()
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        _guard(path, lambda: pwrite_all(self.fd, memoryview(head), 0))
        self.hasher = FileHasher(self.fd, head, self.size)

    def write(self, name: str, data: memoryview) -> None:
        begin, end = self.offsets[name]
        _guard(self.path, lambda: pwrite_all(self.fd, data, begin))
        self.written.add(name)
        self.hasher.finished(begin, end)

    def copy_range(self, name: str, src: Path, src_offset: int) -> None:
        """Copy a tensor's bytes file-to-file inside the kernel (no trip through user memory)."""
        begin, end = self.offsets[name]
        with open(src, "rb") as f:
            _guard(self.path, lambda: copy_range(f.fileno(), src_offset, self.fd, begin, end - begin))
        self.written.add(name)
        self.hasher.finished(begin, end)

    def close(self) -> str:
        try:
            return self.hasher.digest()
        finally:
            self._close_fd()

    def abort(self) -> None:
        self.hasher.cancel()
        self._close_fd()

    def _close_fd(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


# copy_file_range cannot copy between these (another filesystem, or one without support): the
# bytes then go through user memory in bounded pieces, as cp falls back to read/write.
_NO_KERNEL_COPY = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF)
_COPY_PIECE = 64 * 2**20


def copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, count: int) -> None:
    """Copy `count` bytes between files: in the kernel where it can, else by pread/pwrite."""
    done = 0
    while done < count:
        try:
            n = os.copy_file_range(src_fd, dst_fd, count - done, src_offset + done, dst_offset + done)
        except OSError as e:
            if e.errno not in _NO_KERNEL_COPY:
                raise
            _copy_plain(src_fd, src_offset + done, dst_fd, dst_offset + done, count - done)
            return
        if n == 0:
            raise OSError(errno.EIO, "short copy (source file truncated?)")
        done += n


def _copy_plain(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, count: int) -> None:
    done = 0
    while done < count:
        piece = os.pread(src_fd, min(_COPY_PIECE, count - done), src_offset + done)
        if not piece:
            raise OSError(errno.EIO, "short copy (source file truncated?)")
        pwrite_all(dst_fd, memoryview(piece), dst_offset + done)
        done += len(piece)


def _guard(path: Path, action) -> None:
    """Run a write; a full disk becomes DiskFullError and any other OS error names the file."""
    try:
        action()
    except OSError as e:
        if e.errno in (28, 122):  # ENOSPC, EDQUOT
            raise DiskFullError(f"{path}: disk full while writing ({e.strerror})") from None
        raise OutputError(f"{path}: {e.strerror or e}") from None


class ShardedWriter:
    """Write a planned set of tensors into transformers-style safetensors shards.

    `add(name, tensor)` checks the tensor against its planned shape and dtype (naming it if they
    differ); `close()` checks every planned tensor arrived, writes the index and returns
    {file name: sha256}.
    """

    def __init__(self, out_dir: Path, specs: list[TensorSpec], max_shard_size: int,
                 prefix: str = "model", metadata: dict[str, str] | None = None):
        self.out_dir = out_dir
        groups = assign_shards(specs, max_shard_size)
        n = len(groups)
        self.shards: list[_Shard] = []
        self._where: dict[str, _Shard] = {}
        for i, group in enumerate(groups):
            name = f"{prefix}.safetensors" if n == 1 else f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
            shard = _Shard(out_dir / name, group, metadata)
            self.shards.append(shard)
            for spec in group:
                self._where[spec.name] = shard
        self.total_size = sum(s.nbytes for s in specs)
        self.prefix = prefix
        self.hashes: dict[str, str] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        shard = self._where.get(name)
        if shard is None:
            raise ShapeError(f"tensor '{name}' is not in the output plan")
        spec = shard.specs[name]
        if tuple(tensor.shape) != tuple(spec.shape) or tensor.dtype != spec.dtype:
            raise ShapeError(f"tensor '{name}': got {list(tensor.shape)} {tensor.dtype}, "
                             f"the plan says {list(spec.shape)} {spec.dtype}")
        if name in shard.written:
            raise ShapeError(f"tensor '{name}' written twice")
        shard.write(name, tensor_bytes(tensor))

    def add_range(self, name: str, spec: TensorSpec, src: Path, offset: int) -> None:
        """Write a tensor whose bytes already lie in `src` at `offset`, unchanged (a pass-through)."""
        shard = self._where.get(name)
        if shard is None or shard.specs[name] != spec:
            raise ShapeError(f"tensor '{name}' does not match the output plan")
        if name in shard.written:
            raise ShapeError(f"tensor '{name}' written twice")
        shard.copy_range(name, src, offset)

    def close(self) -> dict[str, str]:
        missing = [n for n, s in self._where.items() if n not in s.written]
        if missing:
            raise ShapeError(f"{len(missing)} planned tensors were never written (first: '{missing[0]}')")
        for shard in self.shards:
            self.hashes[shard.path.name] = shard.close()
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {n: s.path.name for n, s in sorted(self._where.items())},
            }
            path = self.out_dir / f"{self.prefix}.safetensors.index.json"
            _guard(path, lambda: path.write_text(json.dumps(index, indent=2) + "\n"))
        return self.hashes

    def abort(self) -> None:
        for shard in self.shards:
            shard.abort()
