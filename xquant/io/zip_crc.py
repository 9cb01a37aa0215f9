"""The CRC-32 that a torch zip checkpoint records for each stored member, checked over the bytes a
reader hands out (torch.load(mmap=True) maps the storages without checking them, so a damaged byte
would pass into the output).

zlib computes CRC-32 at ~1.5-2 GB/s on this machine: on the reader's thread that is a second or
more per 2 GB on the path every tensor takes (measured: Meta -> HF of 2.2 GB went from 11.4 s to
17.7 s with the CRC and NaN/inf scans on that thread). So a helper thread verifies the members in
file order, ahead of the reader, reading them with pread into one reused buffer: the bytes come
from the page cache (warming it when the file is cold) and add nothing to the process's resident
memory. `check` still returns only once the member is verified, waiting for the helper when it is
busy with that member, or verifying it itself when the helper has not got there, so no unverified
byte is ever handed out. The helper goes at most AHEAD bytes past the furthest member asked for,
so a reader that takes a few tensors does not cause the whole file to be read.

With `scan`, the same pass also records whether each member holds only finite values (the NaN/inf
scan of io/finite.py, on the chunk while it is in cache), for storages that one tensor covers
whole: a caller that only copies the tensor need not scan it again (`finite`).
"""

from __future__ import annotations

import os
import struct
import threading
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CorruptFileError
from .finite import all_finite

CHUNK = 4 << 20  # a pread and a CRC step: stays in cache for the scan that follows
AHEAD = 256 << 20  # how far the helper verifies past the furthest member asked for


@dataclass(frozen=True)
class _Member:
    name: str
    start: int  # file offset of the member's bytes
    size: int
    crc: int


def is_storage(member: str) -> bool:
    """Tensor storages are the members of the archive's data/ folder (archive/data/0, ...)."""
    parts = member.split("/")
    return len(parts) >= 2 and parts[-2] == "data"


class ZipCRC:
    """The CRC-32 of every storage member of one torch zip checkpoint, checked before its bytes are
    read; the small members (the pickle itself) are checked when the file is opened."""

    def __init__(self, path: Path, scan: bool = False):
        self.path = path
        self.size = 0
        self.base: int | None = None  # address of file offset 0 in the current mapping
        self._scan = scan
        try:
            self.size = os.path.getsize(path)
            with zipfile.ZipFile(path) as z, open(path, "rb") as f:
                members = []
                for info in z.infolist():
                    f.seek(info.header_offset)
                    head = f.read(30)
                    if len(head) < 30 or head[:4] != b"PK\x03\x04":
                        raise CorruptFileError(f"{path}: damaged zip member '{info.filename}' (no local header)")
                    name_len, extra_len = struct.unpack("<HH", head[26:30])
                    members.append(_Member(info.filename, info.header_offset + 30 + name_len + extra_len,
                                           info.file_size, info.CRC))
                    if not is_storage(info.filename) and info.file_size <= 1 << 26:
                        z.read(info)  # zipfile checks the CRC of what it reads
        except zipfile.BadZipFile as e:
            raise CorruptFileError(f"{path}: damaged checkpoint ({e})") from None
        except OSError as e:
            raise CorruptFileError(f"{path}: cannot read ({e.strerror})") from None
        self._order = sorted((m for m in members if is_storage(m.name) and m.size), key=lambda m: m.start)
        self._by_start = {m.start: m for m in self._order}
        self._dtypes: dict[str, torch.dtype] = {}  # member -> dtype of the one tensor covering it whole
        # Verification state, shared with the helper thread (under _cond).
        self._cond = threading.Condition()
        self._ok: dict[str, bool] = {}  # member -> CRC matched
        self._finite: dict[str, bool] = {}  # member -> no NaN/inf (scanned members only)
        self._busy: set[str] = set()  # being verified (by the helper or a caller)
        self._next = 0  # the helper's position in _order
        self._horizon = 0  # file offset the helper may verify up to
        self._helper_running = False

    # ------------------------------------------------------------ the reader's side

    def bind(self, state: dict[str, torch.Tensor]) -> None:
        """Locate the storages of a freshly loaded mapping: all share one mapping of the file, so
        an address minus the mapping's base is the member's file offset."""
        storages: dict[int, list[torch.Tensor]] = {}
        for t in state.values():
            if t.untyped_storage().nbytes():
                storages.setdefault(t.untyped_storage().data_ptr(), []).append(t)
        starts = sorted(self._by_start)
        self.base = None
        if storages and len(storages) == len(starts):
            base = min(storages) - starts[0]
            if all(p - base in self._by_start for p in storages):
                self.base = base
                for p, ts in storages.items():
                    t = ts[0]
                    whole = t.storage_offset() == 0 and t.is_contiguous() and \
                        t.numel() * t.element_size() == t.untyped_storage().nbytes()
                    if len(ts) == 1 and whole:
                        self._dtypes[self._by_start[p - base].name] = t.dtype
                return
        self.verify_all()  # storages not where the zip says (not mapped): check the file as a whole

    def _member(self, t: torch.Tensor) -> _Member | None:
        storage = t.untyped_storage()
        if self.base is None or not storage.nbytes():
            return None
        return self._by_start.get(storage.data_ptr() - self.base)

    def check(self, key: str, t: torch.Tensor) -> None:
        """Raise CorruptFileError if the bytes of t's storage differ from what the zip recorded."""
        member = self._member(t)
        if member is None:
            return
        with self._cond:
            self._horizon = max(self._horizon, member.start + member.size + AHEAD)
            # A helper that stopped at the horizon starts again once the reader is within half of
            # AHEAD of where it stopped: it keeps its lead, in a few runs rather than one per tensor.
            if (not self._helper_running and self._next < len(self._order)
                    and self._order[self._next].start < self._horizon - AHEAD // 2):
                self._helper_running = True
                # Not a daemon (which it would be by inheritance from the pipeline's producer
                # thread): the interpreter's exit waits for it (at most AHEAD bytes of work) instead
                # of ending it inside a torch call, which aborts the process (std::terminate).
                threading.Thread(target=self._helper, name="xquant-zip-crc", daemon=False).start()
            if self._ok.get(member.name):
                return
            while member.name in self._busy:
                self._cond.wait()
            claimed = member.name not in self._ok
            if claimed:
                self._busy.add(member.name)
        if claimed:  # the helper has not got there: verify it here, over the mapping about to be read
            data = torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())
            self._run(member, lambda a, b: data[a:b].numpy())
        with self._cond:
            ok = self._ok.get(member.name)
        if not ok:
            raise CorruptFileError(f"{self.path}: tensor '{key}' is damaged: its bytes (zip member "
                                   f"'{member.name}') fail the CRC-32 check")

    def finite(self, t: torch.Tensor) -> bool | None:
        """Whether t's values are all finite, as the verifying pass found; None if it did not scan
        them (scanning off, or a storage shared by several tensors or not covered whole)."""
        member = self._member(t)
        if member is None or not self._scan:
            return None
        with self._cond:
            return self._finite.get(member.name)

    # ------------------------------------------------------------ verification

    def _verify(self, m: _Member, read) -> tuple[bool, bool | None]:
        """(CRC matches, all values finite or None when not scanned) of member m, whose bytes
        [a, b) `read(a, b)` returns, chunk by chunk (CHUNK is a multiple of every element size)."""
        dtype = self._dtypes.get(m.name) if self._scan else None
        crc, finite = 0, (True if dtype is not None else None)
        for a in range(0, m.size, CHUNK):
            chunk = read(a, min(m.size, a + CHUNK))
            crc = zlib.crc32(chunk, crc)
            if finite:
                finite = all_finite(torch.frombuffer(chunk, dtype=dtype))
        return crc == m.crc, finite

    def _run(self, m: _Member, read) -> None:
        """Verify m (marked busy by the caller) and record the result; on an error the member is
        only released, for the next `check` to verify again."""
        result = None
        try:
            result = self._verify(m, read)
        finally:
            with self._cond:
                if result is not None:
                    self._ok[m.name] = result[0]
                    if result[1] is not None:
                        self._finite[m.name] = result[1]
                self._busy.discard(m.name)
                self._cond.notify_all()

    def _helper(self) -> None:
        """Verify members in file order up to the horizon; exit when there is nothing more to do
        (check starts a new helper once the horizon moves on) or on a read error (the file
        truncated or gone: the callers' own checks over the mapping then meet it)."""
        buf = bytearray(CHUNK)
        try:
            with open(self.path, "rb", buffering=0) as f:
                while True:
                    with self._cond:
                        while self._next < len(self._order) and (self._order[self._next].name in self._ok or
                                                                self._order[self._next].name in self._busy):
                            self._next += 1
                        if self._next >= len(self._order) or self._order[self._next].start >= self._horizon:
                            self._helper_running = False  # decided under the lock `check` starts helpers under
                            return
                        m = self._order[self._next]
                        self._busy.add(m.name)
                    self._run(m, lambda a, b: _pread(f, buf, m, a, b))
        except Exception:
            with self._cond:
                self._next = len(self._order)  # no more helpers: every check verifies its own member
                self._helper_running = False

    def verify_all(self) -> None:
        """Check every storage member by reading the file once, in chunks (storages not mapped)."""
        buf = bytearray(CHUNK)
        with open(self.path, "rb", buffering=0) as f:
            for m in self._order:
                if self._ok.get(m.name):
                    continue
                ok, _ = self._verify(m, lambda a, b: _pread(f, buf, m, a, b))
                if not ok:
                    raise CorruptFileError(f"{self.path}: zip member '{m.name}' is damaged: its bytes fail "
                                           f"the CRC-32 check")
                self._ok[m.name] = True


def _pread(f, buf: bytearray, m: _Member, a: int, b: int) -> memoryview:
    """Bytes [a, b) of member m, read into buf (b - a <= len(buf))."""
    view = memoryview(buf)[: b - a]
    done = 0
    while done < len(view):
        n = os.preadv(f.fileno(), [view[done:]], m.start + a + done)
        if not n:
            raise CorruptFileError(f"{f.name}: truncated inside zip member '{m.name}'")
        done += n
    return view
