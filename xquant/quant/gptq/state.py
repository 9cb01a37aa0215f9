"""The resume state of a GPTQ run: finished layers and the activations entering the next one.

It lives beside the output as `.OUT.xquant-gptq-resume/` (a name that says what it is):
- `layer-NNNNN.safetensors`: the packed tensors of each finished decoder layer;
- `inputs-NNNNN.safetensors`: the calibration activations entering layer NNNNN;
- `state.json`: which layers are done, the fingerprint of everything that shapes the result
  (model files, options, calibration windows, xquant version), and per-layer statistics.
Each step is written to a temporary name and renamed, and state.json is renamed last, so a
crash at any point leaves a state that names only complete files. Resuming after layer k loads
exactly the bytes layer k+1 would have seen, so the output is byte-identical to an
uninterrupted run. The folder is removed once the artifact is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ...errors import InputError, OutputError
from ...io.readers import SafetensorsReader
from ...io.writer import ShardedWriter, TensorSpec

STATE_VERSION = 1
STATE_FILE = "state.json"


def state_dir_for(out: Path) -> Path:
    out = Path(out).expanduser().resolve()
    return out.parent / f".{out.name}.xquant-gptq-resume"


def _write_tensors(directory: Path, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """tensors -> directory/name.safetensors, atomically (written under a dot-name, then renamed)."""
    tmp_prefix = f".tmp-{name}"
    specs = [TensorSpec(k, tuple(t.shape), t.dtype) for k, t in tensors.items()]
    writer = ShardedWriter(directory, specs, max_shard_size=2 ** 62, prefix=tmp_prefix)
    try:
        for k, t in tensors.items():
            writer.add(k, t.contiguous())
        writer.close()
    except BaseException:
        writer.abort()
        (directory / f"{tmp_prefix}.safetensors").unlink(missing_ok=True)
        raise
    os.replace(directory / f"{tmp_prefix}.safetensors", directory / f"{name}.safetensors")


class ResumeState:
    """Read and advance the state folder of one run."""

    def __init__(self, path: Path, fingerprint: str, num_layers: int):
        self.path = path
        self.fingerprint = fingerprint
        self.num_layers = num_layers
        self.done = -1
        self.stats: list[dict[str, Any]] = []
        self.inputs_name: str | None = None

    # ------------------------------------------------------------ opening

    @classmethod
    def start(cls, out: Path, fingerprint: str, num_layers: int, resume: bool, force: bool) -> "ResumeState":
        """A fresh state, or the saved one when resuming; refuses to silently discard progress."""
        path = state_dir_for(out)
        state = cls(path, fingerprint, num_layers)
        if path.exists() and resume:
            state._load()
            return state
        if path.exists() and not force:
            raise OutputError(f"{path}: a resume state of an interrupted run exists "
                              f"(use --resume to continue it, or --force to start over)")
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir()
        state._save()
        return state

    def _load(self) -> None:
        file = self.path / STATE_FILE
        try:
            saved = json.loads(file.read_text())
            version, fingerprint = saved["version"], saved["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            raise InputError(f"{file}: unreadable resume state (delete the folder or use --force)") from None
        if version != STATE_VERSION or fingerprint != self.fingerprint or saved.get("layers") != self.num_layers:
            raise InputError(f"{self.path}: the resume state was made with a different model, options, calibration "
                             f"or xquant version (use the same command, or --force to start over)")
        self.done = int(saved["done"])
        self.stats = list(saved.get("stats", []))
        self.inputs_name = saved.get("inputs")
        for i in range(self.done + 1):
            if not self.layer_file(i).exists():
                raise InputError(f"{self.layer_file(i)}: missing from the resume state (use --force to start over)")
        if self.inputs_name and not (self.path / self.inputs_name).exists():
            raise InputError(f"{self.path / self.inputs_name}: missing from the resume state (use --force to start over)")
        if 0 <= self.done < self.num_layers - 1 and not self.inputs_name:  # before layer 0 they are recomputed
            raise InputError(f"{self.path}: the resume state has no activations for layer {self.done + 1} "
                             f"(use --force to start over)")

    def _save(self) -> None:
        record = {"version": STATE_VERSION, "fingerprint": self.fingerprint, "layers": self.num_layers,
                  "done": self.done, "inputs": self.inputs_name, "stats": self.stats}
        tmp = self.path / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, self.path / STATE_FILE)

    # ------------------------------------------------------------ progress

    @property
    def next_layer(self) -> int:
        return self.done + 1

    def layer_file(self, i: int) -> Path:
        return self.path / f"layer-{i:05d}.safetensors"

    def _inputs_file_name(self, i: int) -> str:
        return f"inputs-{i:05d}"

    def has_inputs(self) -> bool:
        return self.inputs_name is not None

    def save_inputs(self, layer: int, inputs: torch.Tensor) -> None:
        """The activations entering `layer` (used for layer 0: the embedded calibration batch)."""
        name = self._inputs_file_name(layer)
        _write_tensors(self.path, name, {"inputs": inputs})
        old, self.inputs_name = self.inputs_name, f"{name}.safetensors"
        self._save()
        self._drop(old)

    def load_inputs(self) -> torch.Tensor:
        file = self.path / self.inputs_name
        return SafetensorsReader(self.path, [file]).get("inputs")

    def commit_layer(self, i: int, tensors: dict[str, torch.Tensor], outputs: torch.Tensor | None,
                     stats: dict[str, Any]) -> None:
        """Layer i is finished: its tensors, the next layer's inputs, then the state, in that order."""
        if i != self.done + 1:
            raise OutputError(f"{self.path}: layer {i} committed out of order (next is {self.done + 1})")
        _write_tensors(self.path, self.layer_file(i).stem, tensors)
        old = self.inputs_name
        if outputs is not None and i + 1 < self.num_layers:
            name = self._inputs_file_name(i + 1)
            _write_tensors(self.path, name, {"inputs": outputs})
            self.inputs_name = f"{name}.safetensors"
        else:
            self.inputs_name = None
        self.done = i
        self.stats.append(stats)
        self._save()
        if old != self.inputs_name:
            self._drop(old)

    def _drop(self, name: str | None) -> None:
        if name:
            (self.path / name).unlink(missing_ok=True)

    def layer_reader(self, i: int) -> SafetensorsReader:
        return SafetensorsReader(self.path, [self.layer_file(i)])

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class LayerFiles:
    """Reads finished layers' tensors back from a state folder for the final assembly, keeping
    one layer file open at a time (the pipeline calls release() between layers)."""

    def __init__(self, path: Path):
        self.path = path
        self._open: tuple[int, SafetensorsReader] | None = None

    def producer(self, name: str, layer: int):
        return lambda: self.get(name, layer)

    def get(self, name: str, layer: int) -> torch.Tensor:
        if self._open is None or self._open[0] != layer:
            file = self.path / f"layer-{layer:05d}.safetensors"
            if not file.exists():
                raise InputError(f"{file}: missing; the layer walker has not finished layer {layer}")
            self._open = (layer, SafetensorsReader(self.path, [file]))
        return self._open[1].get(name)

    def release(self) -> None:
        self._open = None
