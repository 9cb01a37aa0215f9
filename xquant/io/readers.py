"""Lazy checkpoint readers: tensor names, shapes and dtypes without reading data; one tensor at a time.

Three on-disk layouts are read:
- Hugging Face safetensors (one file, or shards with `model.safetensors.index.json`);
- Hugging Face legacy `pytorch_model*.bin` (zip pickles, loaded with weights_only=True, mmap=True);
- Meta's original `consolidated.NN.pth` model-parallel shards (same loader).
Pickles are only ever opened with `weights_only=True`: a file holding anything but tensors is
refused, never executed. Their tensors are mapped, not read through zipfile, so the CRC-32 the zip
records for each member is checked (zip_crc.py) before a tensor's bytes are first handed out.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..errors import CorruptFileError, InputError
from .safetensors_file import Entry, read_header, read_tensor
from .pages import drop_resident
from .zip_crc import ZipCRC


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


class TensorReader:
    """Base class: a name -> tensor mapping backed by files, read lazily."""

    # Whether `get` returns a private file mapping of the tensor's bytes made for that call alone,
    # whose pages the caller may hand back once read (pages.drop_resident).
    private_mappings = False

    def __init__(self, root: Path):
        self.root = root
        self._infos: dict[str, TensorInfo] = {}

    def names(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise InputError(f"{self.root}: no tensor named '{name}'") from None

    def infos(self) -> list[TensorInfo]:
        return list(self._infos.values())

    def files(self) -> list[Path]:
        return sorted({i.file for i in self._infos.values()})

    def get(self, name: str) -> torch.Tensor:
        """The tensor's data, in memory owned by the caller."""
        raise NotImplementedError

    def view(self, name: str) -> torch.Tensor:
        """The tensor's data without a copy where the reader can give one, for reading only: the
        caller must not modify it (another `view` or `get` of the same name may share it)."""
        return self.get(name)

    def release(self) -> None:
        """Drop any mapping or cache held for earlier reads (called between layers)."""

    def byte_range(self, name: str) -> tuple[Path, int] | None:
        """(file, offset) where the tensor's raw little-endian bytes lie contiguously, if they do."""
        return None

    def scanned_finite(self, name: str) -> bool | None:
        """Whether the tensor's values are known to be all finite from a check the reader already
        made over its bytes; None when no such check was made (the caller scans)."""
        return None

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())


class SafetensorsReader(TensorReader):
    """One or more safetensors files; every header is validated up front."""

    private_mappings = True  # safetensors_file.read_tensor maps each tensor's range on its own

    def __init__(self, root: Path, files: list[Path]):
        super().__init__(root)
        self._entries: dict[str, tuple[Path, Entry]] = {}
        for file in files:
            entries, _ = read_header(file)
            for name, entry in entries.items():
                if name in self._entries:
                    raise CorruptFileError(f"{file}: tensor '{name}' also appears in {self._entries[name][0].name}")
                self._entries[name] = (file, entry)
                self._infos[name] = TensorInfo(name, entry.shape, entry.dtype, file)

    def get(self, name: str) -> torch.Tensor:
        self.info(name)
        file, entry = self._entries[name]
        return read_tensor(file, entry)

    def byte_range(self, name: str) -> tuple[Path, int] | None:
        self.info(name)
        file, entry = self._entries[name]
        return file, entry.begin


def _refusal(e: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused, without its advice to load with weights_only=False
    (which would run the file's code)."""
    text = str(e)
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if m:
        return f"it refers to {m.group(1).rstrip('.')}, which is not a tensor type"
    for line in text.strip().splitlines():
        line = line.strip()
        if line and "weights_only" not in line and not line.startswith(("Weights only load failed", "(1)", "(2)")):
            return line
    return "unsafe content"


def load_pickle_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """torch.load a tensor checkpoint safely (weights_only) and lazily (mmap) where possible."""
    try:
        mmap = zipfile.is_zipfile(path)  # mmap needs the zip format; very old files are not
        with warnings.catch_warnings():  # torch warns about legacy formats; errors are ours to report
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise CorruptFileError(f"{path}: refused to load, it holds more than tensors ({_refusal(e)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CorruptFileError(f"{path}: damaged checkpoint ({first})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CorruptFileError(f"{path}: not a tensor checkpoint (expected a dict of tensors)")
    return obj


class PickleReader(TensorReader):
    """`pytorch_model*.bin` or Meta `consolidated.NN.pth` files, memory-mapped.

    Callers `release()` after each layer so that the file pages they touched stop counting against
    the process. Each tensor's bytes are checked against the zip's CRC-32 before they are first
    handed out (`ZipCRC`, which verifies ahead of the reader on a thread of its own).
    """

    # Whether the CRC pass also scans each tensor for NaN/inf (`scanned_finite`).
    scan_finite = False

    def __init__(self, root: Path, files: list[Path]):
        super().__init__(root)
        self._files = files
        self._loaded: dict[Path, dict[str, torch.Tensor]] = {}
        self._crc: dict[Path, ZipCRC | None] = {}
        for file in files:
            for name, t in self._load(file).items():
                if name in self._infos:
                    raise CorruptFileError(f"{file}: tensor '{name}' also appears in {self._infos[name].file.name}")
                self._infos[name] = TensorInfo(name, tuple(t.shape), t.dtype, file)
        self.release()

    def _load(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._loaded:
            if file not in self._crc:
                self._crc[file] = ZipCRC(file, scan=self.scan_finite) if zipfile.is_zipfile(file) else None
            self._loaded[file] = load_pickle_checkpoint(file)
            if self._crc[file] is not None:
                self._crc[file].bind(self._loaded[file])
        return self._loaded[file]

    def _key(self, name: str) -> str:
        """The tensor's name inside its file."""
        return name

    def view(self, name: str) -> torch.Tensor:
        """The tensor in its file's mapping (page-cache pages, copied on write), CRC-checked."""
        file, key = self.info(name).file, self._key(name)
        t = self._load(file)[key]
        crc = self._crc.get(file)
        if crc is not None:
            crc.check(key, t)
        return t

    def get(self, name: str) -> torch.Tensor:
        try:
            return self.view(name).clone()
        except RuntimeError as e:  # a mapped page beyond the end of a truncated file
            raise CorruptFileError(f"{self.info(name).file}: cannot read tensor '{self._key(name)}' ({e})") from None

    def scanned_finite(self, name: str) -> bool | None:
        """Whether the tensor's values are all finite, as the CRC pass over its bytes found (after
        `view`/`get`, with `scan_finite`); None when that pass did not scan them."""
        file = self.info(name).file
        crc = self._crc.get(file)
        if crc is None or file not in self._loaded:
            return None
        return crc.finite(self._loaded[file][self._key(name)])

    def release(self) -> None:
        """Drop the pages of the mappings from the process. A file whose storages all lie in one
        mapping of it (`ZipCRC.base`) keeps its unpickled state: unpickling again costs ~30 ms per
        file and layer (1.4 s of a 2-shard, 22-layer conversion, on the reader's thread), while
        MADV_DONTNEED frees the same pages as unmapping does. Other files are dropped."""
        for file in list(self._loaded):
            crc = self._crc.get(file)
            if crc is None or crc.base is None or not drop_resident(crc.base, crc.size):
                del self._loaded[file]


def _shard_sort_key(p: Path):
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", p.name)]


def hf_weight_files(directory: Path) -> tuple[str, list[Path]]:
    """('safetensors'|'bin', files) of a Hugging Face model directory, index-checked."""
    for kind, index_name, single in (
        ("safetensors", "model.safetensors.index.json", "model.safetensors"),
        ("bin", "pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = directory / index_name
        if index.exists():
            weight_map = read_weight_map(index)
            files = sorted({directory / f for f in weight_map.values()}, key=_shard_sort_key)
            for f in files:
                if not f.exists():
                    raise InputError(f"{index}: names shard '{f.name}', which is missing")
            return kind, files
        if (directory / single).exists():
            return kind, [directory / single]
    found = sorted(directory.glob("*.safetensors"), key=_shard_sort_key)
    if found:
        return "safetensors", found
    raise InputError(f"{directory}: no weights found (model.safetensors, shards with an index, or pytorch_model.bin)")


def read_weight_map(index: Path) -> dict[str, str]:
    """An index's tensor name -> shard file name."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise CorruptFileError(f"{index}: not a valid index (no 'weight_map')") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CorruptFileError(f"{index}: not a valid index ('weight_map' is not names -> shard files)")
    return weight_map


def check_index(reader: TensorReader, index: Path, weight_map: dict[str, str]) -> None:
    """The index must place every tensor in the shard that holds it, and name no other: loaders
    (transformers) trust it, so a tensor it misplaces or omits would load wrong or not at all."""
    for name, shard in weight_map.items():
        if name not in reader:
            raise CorruptFileError(f"{index}: names tensor '{name}' in {shard}, which does not hold it "
                                   f"(nor does any shard it names)")
        held = reader.info(name).file.name
        if held != shard:
            raise CorruptFileError(f"{index}: places tensor '{name}' in {shard}, but {held} holds it")
    for name in reader.names():
        if name not in weight_map:
            raise CorruptFileError(f"{index}: does not name tensor '{name}', which {reader.info(name).file.name} holds")


def meta_weight_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("consolidated.*.pth"), key=_shard_sort_key)
    if not files:
        raise InputError(f"{directory}: no consolidated.NN.pth shards found")
    numbers = [int(f.name.split(".")[1]) for f in files]
    missing = sorted(set(range(max(numbers) + 1)) - set(numbers))
    if missing:
        raise InputError(f"{directory}: shard consolidated.{missing[0]:02d}.pth is missing "
                         f"({len(files)} of {max(numbers) + 1} present)")
    return files


def open_hf_tensors(directory: Path) -> TensorReader:
    kind, files = hf_weight_files(directory)
    reader = SafetensorsReader(directory, files) if kind == "safetensors" else PickleReader(directory, files)
    index = directory / ("model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json")
    if index.exists():
        check_index(reader, index, read_weight_map(index))
    return reader


def open_meta_tensors(directory: Path) -> PickleReader:
    """A reader over all shards; tensor names are prefixed 'NN/' by shard number."""
    reader = _MetaShardsReader(directory, meta_weight_files(directory))
    return reader


class _MetaShardsReader(PickleReader):
    """Meta shards hold the same names; expose them as '<shard index>/<name>'. The conversion only
    copies their bytes, so the NaN/inf scan rides on the CRC pass (`scanned_finite`)."""

    scan_finite = True

    def __init__(self, root: Path, files: list[Path]):
        TensorReader.__init__(self, root)
        self._files = files
        self._loaded = {}
        self._crc = {}
        self.shard_count = len(files)
        for i, file in enumerate(files):
            for name, t in self._load(file).items():
                self._infos[f"{i}/{name}"] = TensorInfo(f"{i}/{name}", tuple(t.shape), t.dtype, file)
        self.release()

    def _key(self, name: str) -> str:
        return name.split("/", 1)[1]

    def shard_names(self, shard: int) -> list[str]:
        prefix = f"{shard}/"
        return [n[len(prefix):] for n in self._infos if n.startswith(prefix)]
