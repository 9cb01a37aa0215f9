"""Streaming IO: the safetensors writer and readers on real files, and the atomic output rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from xquant.errors import CorruptFileError, InputError, OutputError, ShapeError
from xquant.io.hashing import sha256_file
from xquant.io.output import MANIFEST_NAME, Provenance, atomic_dir
from xquant.io.readers import PickleReader, SafetensorsReader, open_hf_tensors
from xquant.io.safetensors_file import read_header
from xquant.io.writer import ShardedWriter, TensorSpec

from helpers import write_safetensors


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(64, 48, generator=g),
        "b.weight": torch.randn(33, 7, generator=g).to(torch.float16),
        "c.weight": torch.randn(128, 16, generator=g).to(torch.bfloat16),
        "d.qweight": torch.randint(-2**31, 2**31 - 1, (16, 40), generator=g, dtype=torch.int32),
        "e.SCB": torch.randint(0, 255, (13,), generator=g, dtype=torch.uint8),
        "f.scalar": torch.tensor(3.5),
    }


def test_sharded_write_reads_back_in_safetensors_and_xquant(tmp_path):
    tensors = _tensors()
    hashes = write_safetensors(tmp_path, tensors, max_shard_size=5_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert set(hashes) == set(files)
    for f in files:
        assert hashes[f] == sha256_file(tmp_path / f)
        entries, meta = read_header(tmp_path / f)
        assert meta == {"format": "pt"}
        for e in entries.values():  # every tensor aligned to its element size
            assert e.begin % e.dtype.itemsize == 0
    for name, t in tensors.items():
        with safe_open(tmp_path / index["weight_map"][name], framework="pt") as f:
            assert torch.equal(f.get_tensor(name), t)
    reader = open_hf_tensors(tmp_path)
    assert isinstance(reader, SafetensorsReader)
    for name, t in tensors.items():
        assert reader.info(name).shape == tuple(t.shape) and reader.info(name).dtype == t.dtype
        got = reader.get(name)
        assert got.dtype == t.dtype and torch.equal(got, t)


def test_write_order_does_not_change_bytes(tmp_path):
    tensors = _tensors()
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    ha = write_safetensors(a, tensors)
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    writer = ShardedWriter(b, specs, 10**12)
    for n in reversed(list(tensors)):
        writer.add(n, tensors[n])
    hb = writer.close()
    assert ha == hb
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_writer_checks_the_plan(tmp_path):
    writer = ShardedWriter(tmp_path, [TensorSpec("x", (2, 3), torch.float16)], 10**9)
    with pytest.raises(ShapeError, match="'x'.*plan says"):
        writer.add("x", torch.zeros(3, 2, dtype=torch.float16))
    with pytest.raises(ShapeError, match="never written"):
        writer.close()


def test_pickle_reader_is_lazy_and_exact(tmp_path):
    tensors = {k: v for k, v in _tensors().items()}
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    reader = open_hf_tensors(tmp_path)
    assert isinstance(reader, PickleReader)
    assert reader.info("c.weight").dtype == torch.bfloat16
    for name, t in tensors.items():
        assert torch.equal(reader.get(name), t)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"w": torch.zeros(2), "x": _Evil(marker)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CorruptFileError, match="pytorch_model.bin: refused"):
        open_hf_tensors(tmp_path)
    assert not marker.exists()


def test_truncated_safetensors_is_named(tmp_path):
    write_safetensors(tmp_path, _tensors())
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CorruptFileError, match="model.safetensors: truncated"):
        open_hf_tensors(tmp_path)


def test_index_naming_missing_shard(tmp_path):
    write_safetensors(tmp_path, _tensors(), max_shard_size=5_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(InputError, match=f"names shard '{shard.name}', which is missing"):
        open_hf_tensors(tmp_path)


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("x")
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(out, Provenance("test", {}, [src])) as art:
            (art.path / "half.bin").write_bytes(b"123")
            raise RuntimeError("crash in the middle")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    with atomic_dir(out, Provenance("test", {"k": 1}, [src])) as art:
        (art.path / "whole.bin").write_bytes(b"123")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["options"] == {"k": 1} and manifest["inputs"][0]["sha256"] == sha256_file(src / "a.txt")
    assert manifest["outputs"][0] == {"path": "whole.bin", "size": 3, "sha256": sha256_file(out / "whole.bin")}
    with pytest.raises(OutputError, match="already exists"):
        with atomic_dir(out, Provenance("test", {}, [src])):
            pass
    with pytest.raises(OutputError, match="inside the input directory"):
        with atomic_dir(src / "sub", Provenance("test", {}, [src])):
            pass
    assert (src / "a.txt").read_text() == "x" and not (src / "sub").exists()
