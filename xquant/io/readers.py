"""Lazy checkpoint readers: tensor names, shapes and dtypes without reading data; one tensor at a time.

Three on-disk layouts are read:
- Hugging Face safetensors (one file, or shards with `model.safetensors.index.json`);
- Hugging Face legacy `pytorch_model*.bin` (zip pickles, loaded with weights_only=True, mmap=True);
- Meta's original `consolidated.NN.pth` model-parallel shards (same loader).
Pickles are only ever opened with `weights_only=True`: a file holding anything but tensors is
refused, never executed.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..errors import CorruptFileError, InputError
from .safetensors_file import Entry, read_header, read_tensor


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

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())


class SafetensorsReader(TensorReader):
    """One or more safetensors files; every header is validated up front."""

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


def load_pickle_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """torch.load a tensor checkpoint safely (weights_only) and lazily (mmap) where possible."""
    try:
        mmap = zipfile.is_zipfile(path)  # mmap needs the zip format; very old files are not
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsafe content"
        raise CorruptFileError(f"{path}: refused to load, it holds more than tensors ({first})") from None
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

    The mapped state dicts are kept until `release()`: callers release after each layer so the
    file pages they touched stop counting against the process.
    """

    def __init__(self, root: Path, files: list[Path]):
        super().__init__(root)
        self._files = files
        self._loaded: dict[Path, dict[str, torch.Tensor]] = {}
        for file in files:
            for name, t in self._load(file).items():
                if name in self._infos:
                    raise CorruptFileError(f"{file}: tensor '{name}' also appears in {self._infos[name].file.name}")
                self._infos[name] = TensorInfo(name, tuple(t.shape), t.dtype, file)
        self.release()

    def _load(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._loaded:
            self._loaded[file] = load_pickle_checkpoint(file)
        return self._loaded[file]

    def _key(self, name: str) -> str:
        """The tensor's name inside its file."""
        return name

    def view(self, name: str) -> torch.Tensor:
        """The tensor in its file's mapping (page-cache pages, copied on write)."""
        return self._load(self.info(name).file)[self._key(name)]

    def get(self, name: str) -> torch.Tensor:
        try:
            return self.view(name).clone()
        except RuntimeError as e:  # a mapped page beyond the end of a truncated file
            raise CorruptFileError(f"{self.info(name).file}: cannot read tensor '{self._key(name)}' ({e})") from None

    def release(self) -> None:
        self._loaded.clear()


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
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                raise CorruptFileError(f"{index}: not a valid index (no 'weight_map')") from None
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
    return SafetensorsReader(directory, files) if kind == "safetensors" else PickleReader(directory, files)


def open_meta_tensors(directory: Path) -> PickleReader:
    """A reader over all shards; tensor names are prefixed 'NN/' by shard number."""
    reader = _MetaShardsReader(directory, meta_weight_files(directory))
    return reader


class _MetaShardsReader(PickleReader):
    """Meta shards hold the same names; expose them as '<shard index>/<name>'."""

    def __init__(self, root: Path, files: list[Path]):
        TensorReader.__init__(self, root)
        self._files = files
        self._loaded = {}
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
