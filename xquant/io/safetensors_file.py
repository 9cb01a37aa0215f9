"""Reading and writing the safetensors format directly, one tensor at a time.

We parse the header ourselves instead of going through `safe_open` so that
(1) a truncated or damaged file is reported with its name and what is wrong before any work starts,
(2) a tensor is a private mapping of its own bytes only, unmapped when the tensor is freed: no
    copy is made, and resident memory is bounded by the tensors in use, not by the files touched.
The writer places tensors at offsets fixed by a plan, so a shard can be written in any order and
never needs to be held in memory.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CorruptFileError
from .dtypes import ST_TO_TORCH, TORCH_TO_ST, itemsize

MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's own limit


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: where its bytes are."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> tuple[dict[str, Entry], dict[str, str]]:
    """Parse and validate a safetensors header; returns entries by name and the metadata."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CorruptFileError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise CorruptFileError(f"{path}: damaged safetensors header (header length {n}, file {size} bytes)")
            header_bytes = f.read(n)
    except OSError as e:
        raise CorruptFileError(f"{path}: cannot read ({e.strerror})") from e
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CorruptFileError(f"{path}: damaged safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CorruptFileError(f"{path}: damaged safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    entries: dict[str, Entry] = {}
    for name, spec in header.items():
        if isinstance(spec, dict) and isinstance(spec.get("dtype"), str) and spec["dtype"] not in ST_TO_TORCH:
            raise CorruptFileError(f"{path}: tensor '{name}' has unknown dtype '{spec['dtype']}' "
                                   f"(known: {', '.join(ST_TO_TORCH)})")
        try:
            dtype = ST_TO_TORCH[spec["dtype"]]
            shape = tuple(int(d) for d in spec["shape"])
            begin, end = (int(x) for x in spec["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CorruptFileError(f"{path}: tensor '{name}' has an unreadable header entry") from None
        if begin < 0 or end < begin or any(d < 0 for d in shape):
            raise CorruptFileError(f"{path}: tensor '{name}' has invalid data_offsets [{begin}, {end}] "
                                   f"or shape {list(shape)}")
        expected = itemsize(dtype) * _numel(shape)
        if end - begin != expected:
            raise CorruptFileError(
                f"{path}: tensor '{name}' spans {end - begin} bytes but shape {list(shape)} "
                f"of {spec['dtype']} needs {expected}"
            )
        entries[name] = Entry(name, dtype, shape, data_start + begin, data_start + end)
    data_end = _check_coverage(path, entries, data_start)
    if data_end > size:
        raise CorruptFileError(f"{path}: truncated (the header needs {data_end} bytes, the file has {size})")
    if data_end < size:
        raise CorruptFileError(f"{path}: {size - data_end} bytes after the last tensor's data belong to no "
                               f"tensor (invalid offsets: the header covers {data_end} of {size} bytes)")
    return entries, metadata


def _check_coverage(path: Path, entries: dict[str, Entry], data_start: int) -> int:
    """The tensors' byte ranges must tile the data section exactly, as the reference implementation
    requires ("invalid offset"): no two share bytes, and none leaves a hole. Returns the data's end."""
    pos, previous = data_start, None
    for e in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if e.begin < pos:
            raise CorruptFileError(f"{path}: tensor '{e.name}' (data_offsets [{e.begin - data_start}, "
                                   f"{e.end - data_start}]) overlaps tensor '{previous.name}' "
                                   f"([{previous.begin - data_start}, {previous.end - data_start}]): invalid offsets")
        if e.begin > pos:
            after = f"after tensor '{previous.name}'" if previous else "before the first tensor"
            raise CorruptFileError(f"{path}: {e.begin - pos} bytes {after} belong to no tensor (tensor '{e.name}' "
                                   f"starts at {e.begin - data_start}, not {pos - data_start}): invalid offsets")
        pos, previous = e.end, e
    return pos


def read_tensor(path: Path, entry: Entry) -> torch.Tensor:
    """One tensor as a private (copy-on-write) mapping of just its bytes in the file.

    Mapping instead of reading saves a copy: the tensor's pages are the page cache's until
    someone writes to them, and the file never changes (ACCESS_COPY). The mapping lives exactly as
    long as the tensor, so resident memory is still bounded by the tensors in use. Measured on
    this machine, applying a 2 GB delta read 3-5x faster than with `readinto` into fresh memory,
    whose first touch of every page is most of the cost.
    """
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=entry.dtype)
    start = entry.begin - entry.begin % mmap.ALLOCATIONGRANULARITY
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size < entry.begin + entry.nbytes:
                raise CorruptFileError(f"{path}: truncated inside tensor '{entry.name}'")
            m = mmap.mmap(f.fileno(), entry.begin + entry.nbytes - start, access=mmap.ACCESS_COPY, offset=start)
    except FileNotFoundError:
        raise CorruptFileError(f"{path}: the file disappeared while being read") from None
    flat = torch.frombuffer(m, dtype=torch.uint8, count=entry.nbytes, offset=entry.begin - start)
    return flat.view(entry.dtype).reshape(entry.shape)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def layout(specs: list[tuple[str, tuple[int, ...], torch.dtype]], metadata: dict[str, str] | None
           ) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Header bytes and absolute (begin, end) offsets for tensors to be written to one file.

    Tensors are ordered by decreasing element size (then as given) so that every tensor starts
    at a multiple of its element size: the format forbids holes, so ordering is the only way to
    keep memory-mapping readers' views aligned.
    """
    ordered = sorted(enumerate(specs), key=lambda item: (-itemsize(item[1][2]), item[0]))
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offsets_rel: dict[str, tuple[int, int]] = {}
    pos = 0
    for _, (name, shape, dtype) in ordered:
        nbytes = itemsize(dtype) * _numel(tuple(shape))
        header[name] = {"dtype": TORCH_TO_ST[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets_rel[name] = (pos, pos + nbytes)
        pos += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    head = struct.pack("<Q", len(text)) + text
    return head, {k: (len(head) + a, len(head) + b) for k, (a, b) in offsets_rel.items()}


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A byte view of a tensor's data (any dtype, bf16 included) without a copy when contiguous."""
    t = t.detach().contiguous()
    if t.device.type != "cpu":
        t = t.cpu()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """os.pwrite until every byte is written (large writes may be partial)."""
    done = 0
    total = len(data)
    while done < total:
        done += os.pwrite(fd, data[done: done + (1 << 30)], offset + done)
