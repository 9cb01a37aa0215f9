"""Importance matrices for llama.cpp's quantizer: computed from calibration text with the reference
model, saved and loaded in llama.cpp's imatrix format.

What an importance matrix is (llama.cpp tools/imatrix): for every linear layer (GGUF weight name),
the per-input-column sum of squared activations entering it, and how many activation rows (tokens)
were summed. The quantizer weighs each column's rounding error by sum / count, the mean squared
activation, so columns that carry large inputs are kept more precisely.

File format: the GGUF imatrix format current llama.cpp writes by default and reads first (the
quantizer still falls back to the legacy .dat stream): keys `general.type = "imatrix"`,
`imatrix.datasets` (strings), `imatrix.chunk_count`, `imatrix.chunk_size` (u32); per weight two F32
tensors, `<name>.in_sum2` (ne = [columns, 1]) and `<name>.counts` (ne = [1]).

Computation: calibration text is tokenized and cut into chunks of `chunk_size` tokens starting
with BOS (as llama-imatrix does); the chunks go through the reference model one decoder layer at a
time (transformers' own layer classes, filled from the checkpoint), with a hook on every linear.
Memory: one layer in float32 plus the hidden states of all chunks, never the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

from ..console import info, progress
from ..errors import CorruptFileError, InputError, ShapeError

if TYPE_CHECKING:
    from .plan import GGUFPlan

KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUM_SUFFIX = ".in_sum2"
COUNT_SUFFIX = ".counts"


@dataclass
class Imatrix:
    """name (GGUF weight) -> (sum of squared inputs per column, float64; number of rows summed)."""

    entries: dict[str, tuple[np.ndarray, int]]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    source: str = ""  # where it came from: a file path, or "calibration:<set>"

    def values(self) -> dict[str, np.ndarray]:
        """What the quantizer takes: mean squared activation per column (float32)."""
        return {name: (sums / count if count else np.ones_like(sums)).astype(np.float32)
                for name, (sums, count) in self.entries.items()}

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "datasets": self.datasets, "entries": len(self.entries),
                "chunks": self.chunk_count, "chunk_size": self.chunk_size}

    def check(self, plan: "GGUFPlan") -> None:
        """Every entry names a 2-D weight of the plan with as many columns as it has values."""
        cols = {t.name: t.shape[-1] for t in plan.tensors if len(t.shape) == 2}
        for name, (sums, _) in self.entries.items():
            if name not in cols:
                raise ShapeError(f"{self.source}: importance matrix entry '{name}' is not a weight of {plan.src.name}")
            if sums.size != cols[name]:
                raise ShapeError(f"{self.source}: importance matrix entry '{name}' has {sums.size} values, "
                                 f"the weight has {cols[name]} columns")
        if not self.entries:
            raise InputError(f"{self.source}: the importance matrix is empty")

    def save(self, path: Path) -> None:
        """Write llama.cpp's GGUF imatrix file."""
        writer = gguf.GGUFWriter(path, "imatrix")
        writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama-imatrix writes none
        writer.add_type("imatrix")
        writer.add_array(KEY_DATASETS, self.datasets or ["unknown"])
        writer.add_uint32(KEY_CHUNK_COUNT, self.chunk_count)
        writer.add_uint32(KEY_CHUNK_SIZE, self.chunk_size)
        for name in sorted(self.entries):
            sums, count = self.entries[name]
            writer.add_tensor(name + SUM_SUFFIX, sums.astype(np.float32).reshape(1, -1))
            writer.add_tensor(name + COUNT_SUFFIX, np.array([count], dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    @classmethod
    def load(cls, path: Path) -> "Imatrix":
        """Read a GGUF imatrix file (written by llama-imatrix or by xquant)."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no such importance matrix file")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise CorruptFileError(f"{path}: not a GGUF imatrix file (legacy .dat files: convert them "
                                       f"with llama-imatrix --in-file {path.name} -o {path.stem}.gguf)")
        try:
            reader = gguf.GGUFReader(path)
        except (ValueError, OSError) as e:
            raise CorruptFileError(f"{path}: damaged GGUF ({e})") from None
        tensors = {t.name: t for t in reader.tensors}
        entries = {}
        for name, t in tensors.items():
            if not name.endswith(SUM_SUFFIX):
                continue
            base = name[: -len(SUM_SUFFIX)]
            counts = tensors.get(base + COUNT_SUFFIX)
            if counts is None:
                raise CorruptFileError(f"{path}: '{name}' has no matching '{base}{COUNT_SUFFIX}'")
            if counts.n_elements != 1:
                raise CorruptFileError(f"{path}: '{base}' holds {counts.n_elements} experts; xquant reads dense models")
            entries[base] = (np.array(t.data, dtype=np.float64).reshape(-1), int(np.asarray(counts.data).reshape(-1)[0]))

        def scalar(key: str) -> int:
            f = reader.get_field(key)
            return int(f.contents()) if f is not None else 0

        ds = reader.get_field(KEY_DATASETS)
        return cls(entries, list(ds.contents()) if ds is not None else [], scalar(KEY_CHUNK_COUNT),
                   scalar(KEY_CHUNK_SIZE), str(path))


def calibration_chunks(tokenizer, set_name: str, chunk_size: int, n_chunks: int) -> list[list[int]]:
    """Consecutive chunks of the calibration text, each starting with BOS (llama-imatrix's way)."""
    from ..calib import load_set

    ids: list[int] = []
    for doc in load_set(set_name, "calib").documents:
        ids.extend(tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"])
    bos = tokenizer.bos_token_id
    body = chunk_size - (1 if bos is not None else 0)
    if len(ids) < body:
        raise InputError(f"{set_name}: {len(ids)} calibration tokens, fewer than one chunk of {chunk_size}")
    chunks = [ids[i: i + body] for i in range(0, len(ids) - body + 1, body)][:n_chunks]
    return [([bos] if bos is not None else []) + c for c in chunks]


def _causal_mask(n: int):
    import torch

    return torch.full((n, n), float("-inf")).triu(1)[None, None]


def compute_imatrix(plan: "GGUFPlan", threads: int | None = None) -> Imatrix:
    """Run the calibration chunks through the reference model one decoder layer at a time and
    collect, for every linear layer, the squared inputs per column.

    Only one layer's weights (float32) and the hidden states of all chunks are in memory: the
    embedding rows are looked up, each layer is built on the meta device from the architecture's
    own transformers classes and filled with its tensors, run over every chunk, then dropped."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    arch, reader = plan.arch, plan.reader
    names = {t.source: t.name for t in plan.tensors if len(t.shape) == 2 and "token_embd" not in t.name}
    context = int(plan.config.get("max_position_embeddings") or 512)
    chunk_size = min(512, context)
    tokenizer = AutoTokenizer.from_pretrained(plan.src)
    chunks = calibration_chunks(tokenizer, plan.calibration, chunk_size, plan.imatrix_chunks)
    info(f"importance matrix: {len(chunks)} chunks of {chunk_size} tokens from '{plan.calibration}'")
    config = AutoConfig.from_pretrained(plan.src)
    config._attn_implementation = "eager"  # takes the explicit causal mask below as is
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    base = skeleton.get_submodule(arch.layers_module.rsplit(".", 1)[0])
    layer_cls, norm_cls = type(skeleton.get_submodule(arch.layers_module)[0]), type(base.norm)
    rotary = type(base.rotary_emb)(config=config)
    del skeleton, base
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def record(name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        sums[name] = sums.get(name, 0) + (x * x).sum(dim=0)
        counts[name] = counts.get(name, 0) + x.shape[0]

    def tensors_with_prefix(prefix: str) -> dict[str, torch.Tensor]:
        return {n[len(prefix):]: reader.get(n).to(torch.float32) for n in reader.names()
                if n.startswith(prefix) and not n.endswith(("rotary_emb.inv_freq",))}

    embed = reader.get(arch.globals["embed"]).to(torch.float32)
    hidden = [embed[torch.tensor(c)][None] for c in chunks]
    del embed
    positions = torch.arange(chunk_size)[None]
    cos, sin = rotary(hidden[0], positions)
    n_layers = arch.num_layers(plan.config)
    with torch.inference_mode(), progress("importance matrix (layers)", total=n_layers + 1) as advance:
        for i in range(n_layers):
            prefix = f"{arch.layers_module}.{i}."
            with torch.device("meta"):
                layer = layer_cls(config, layer_idx=i)
            layer.load_state_dict(tensors_with_prefix(prefix), strict=True, assign=True)
            hooks = [m.register_forward_pre_hook(lambda mod, args, n=names[prefix + local + ".weight"]: record(n, args[0]))
                     for local, m in layer.named_modules() if prefix + local + ".weight" in names]
            for j, h in enumerate(hidden):
                n = h.shape[1]
                hidden[j] = layer(h, attention_mask=_causal_mask(n), position_ids=positions[:, :n],
                                  position_embeddings=(cos[:, :n], sin[:, :n]))
            for hook in hooks:
                hook.remove()
            del layer
            reader.release()
            advance()
        if arch.globals.get("lm_head") in names:  # the output matrix sees the final norm's output
            norm = norm_cls(config.hidden_size, eps=config.rms_norm_eps)
            norm.load_state_dict({"weight": reader.get(arch.globals["norm"]).to(torch.float32)})
            for h in hidden:
                record(names[arch.globals["lm_head"]], norm(h))
        advance()
    missing = sorted(set(names.values()) - set(sums))
    if missing:
        raise ShapeError(f"{plan.src}: no activations reached {missing[0]} (and {len(missing) - 1} more)")
    entries = {n: (sums[n].numpy(), counts[n]) for n in sums}
    bad = [n for n, (s, _) in entries.items() if not np.isfinite(s).all()]
    if bad:
        raise ShapeError(f"{plan.src}: non-finite activations entering {bad[0]} during calibration")
    return Imatrix(entries, [plan.calibration], len(chunks), chunk_size, f"calibration:{plan.calibration}")
