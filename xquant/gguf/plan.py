"""The GGUF plan: a pure value listing every output tensor (GGUF name, shape, type, bytes, source),
the metadata keys, the vocabulary, the shard layout and a memory estimate. `--dry-run` prints it;
`writer.execute` carries it out. Nothing here reads tensor data.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
from gguf import GGMLQuantizationType as Q

from ..arch import Architecture
from ..errors import InputError, ShapeError, UnsupportedError
from ..io.dtypes import dtype_name, human_bytes, parse_size
from ..io.output import ArtifactDir, Provenance
from ..io.readers import TensorReader
from ..model import detect, open_hf
from ..pipeline import BASE_MEMORY, Executable, Output
from . import outtypes
from .metadata import KV, general_kv, hparams_kv
from .outtypes import CHUNK_VALUES, OutType
from .vocab import Vocab, load_vocab


_ARCHS = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}


@dataclass(frozen=True)
class GGUFTensor:
    """One output tensor: GGUF name and type, torch-order shape, and how to make it."""

    name: str
    shape: tuple[int, ...]
    qtype: Q
    source: str  # the Hugging Face tensor it is made from
    layer: int | None = None
    permute_heads: int | None = None  # reverse HF's rotary permutation with this many heads
    note: str = ""
    stack: tuple[str, ...] = ()  # routed experts: these source tensors stacked on a new first axis

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        block, type_size = gguf.GGML_QUANT_SIZES[self.qtype]
        return self.numel // block * type_size


@dataclass
class GGUFPlan(Executable):
    src: Path
    out: Path
    outtype: OutType
    stage: OutType  # the type xquant writes itself: outtype when direct, else the intermediate
    gguf_arch: str
    arch: Architecture
    kv: list[KV]
    vocab: Vocab
    tensors: list[GGUFTensor]
    reader: TensorReader
    config: dict[str, Any]
    provenance: Provenance
    split_max_size: int = 0
    calibration: str | None = None
    imatrix_chunks: int = 0
    imatrix_file: Path | None = None  # an existing llama.cpp imatrix file, instead of --calibration
    imatrix_out: Path | None = None  # where to save the computed importance matrix
    notes: list[str] = field(default_factory=list)
    allow_nonfinite: bool = False  # NaN/inf weights pass instead of being refused (io/finite.py)
    threads: int | None = None  # llama.cpp's quantizer and the importance matrix (default: all cores)
    matrix: Any = field(default=None, repr=False)  # the importance matrix, once `prepare` has it

    @property
    def title(self) -> str:
        return f"gguf {self.src.name} -> {self.out.name} ({self.outtype.name})"

    def shards(self) -> list[list[GGUFTensor]]:
        """Tensors per output file, split the way gguf-py's writer splits (by size, in order)."""
        if not self.split_max_size:
            return [list(self.tensors)]
        out: list[list[GGUFTensor]] = [[]]
        size = 0
        for t in self.tensors:
            if out[-1] and size + t.nbytes > self.split_max_size:
                out.append([])
                size = 0
            out[-1].append(t)
            size += t.nbytes
        return out

    def output_paths(self) -> list[Path]:
        """OUT.gguf, or llama.cpp's split names OUT-00001-of-0000N.gguf."""
        n = len(self.shards())
        if n == 1:
            return [self.out]
        return [self.out.with_name(f"{self.out.stem}-{i + 1:05d}-of-{n:05d}.gguf") for i in range(n)]

    @property
    def stage_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def temporary_bytes(self) -> int:
        """The unquantized GGUF llama.cpp's quantizer reads, removed after quantizing."""
        return self.stage_bytes if self.outtype.by_llama_cpp else 0

    def estimated_output_bytes(self) -> int:
        if not self.outtype.by_llama_cpp:
            return self.stage_bytes
        return int(sum(t.numel * (self.outtype.bits / 8 if len(t.shape) > 1 else 4) for t in self.tensors))

    def peak_memory_estimate(self) -> int:
        """Largest source tensor + its float32 copy + encoded output + chunk temporaries; with
        --calibration, one decoder layer in float32 plus the hidden states of every chunk (and
        the float32 embedding while it is looked up), see imatrix.py."""
        largest = max(self.tensors, key=lambda t: t.numel)
        src = self.reader.info(largest.source)
        src_bytes = src.nbytes * max(1, len(largest.stack))  # stacked experts: every expert read
        peak = BASE_MEMORY + src_bytes + largest.numel * 4 + largest.nbytes + 4 * 4 * CHUNK_VALUES
        if self.calibration:
            per_layer: dict[int, int] = {}
            for t in self.tensors:
                if t.layer is not None:
                    # stacked experts are briefly held twice: per expert, then fused (imatrix.py)
                    per_layer[t.layer] = per_layer.get(t.layer, 0) + t.numel * 4 * (2 if t.stack else 1)
            hidden = self.imatrix_chunks * 512 * int(self.config.get("hidden_size", 0)) * 4
            embed = max((t.numel * 4 for t in self.tensors if "token_embd" in t.name), default=0)
            peak = max(peak, BASE_MEMORY + 2**30 + hidden + max(max(per_layer.values(), default=0), embed))
        return int(peak)

    def rows(self) -> list[dict[str, Any]]:
        return [{"tensor": t.name, "shape": "x".join(map(str, reversed(t.shape))), "type": t.qtype.name,
                 "bytes": f"{t.nbytes:,}", "from": t.source + (f" ({t.note})" if t.note else "")}
                for t in self.tensors]

    def summary(self) -> dict[str, Any]:
        out = {
            "output": ", ".join(str(p) for p in self.output_paths()),
            "type": self.outtype.name + (f" (llama.cpp quantizer, from a {self.stage.name} GGUF written first)"
                                         if self.outtype.by_llama_cpp else " (written directly)"),
            "architecture": self.gguf_arch,
            "tensors": len(self.tensors),
            "vocabulary": self.vocab.summary(),
            "metadata": ", ".join(f"{kv.key}={kv.display()}" for kv in self.kv),
            "output size": ("about " if self.outtype.by_llama_cpp else "") + human_bytes(self.estimated_output_bytes()),
            "estimated peak memory": human_bytes(self.peak_memory_estimate()),
            "importance matrix": (f"computed from '{self.calibration}' ({self.imatrix_chunks} chunks)"
                                  if self.calibration else f"read from {self.imatrix_file}"
                                  if self.imatrix_file else "none")
                                 + (f", saved to {self.imatrix_out}" if self.imatrix_out else ""),
        }
        if self.outtype.by_llama_cpp:
            out["temporary disk"] = f"{human_bytes(self.stage_bytes)} ({self.stage.name} GGUF, removed after quantizing)"
        for i, note in enumerate(self.notes):
            out[f"note {i + 1}"] = note
        return out

    def to_json(self) -> dict[str, Any]:
        return {"title": self.title, "summary": self.summary(), "tensors": self.rows()}

    # The executor's side (pipeline.execute); the work itself is in writer.py.
    def outputs(self) -> list[Output]:
        files = ([self.imatrix_out] if self.imatrix_out else []) + self.output_paths()
        return [Output(p, directory=False) for p in files]

    def prepare(self, force: bool, resume: bool) -> None:
        from .writer import prepare

        super().prepare(force, resume)
        prepare(self)

    def write(self, handles: list[ArtifactDir]) -> None:
        from .writer import write

        write(self, handles)

    def result(self):
        from .writer import GGUFResult

        outs = self.output_paths()
        return GGUFResult(outs, self.outtype.name, sum(p.stat().st_size for p in outs), len(self.tensors),
                          len(self.matrix.entries) if self.matrix is not None else 0)


def gguf_arch_of(arch: Architecture) -> str:
    if not arch.gguf_arch or arch.gguf_arch not in _ARCHS:
        from ..arch import registry

        ok = sorted({a for name in registry.known() for a in registry.get(name).hf_architectures
                     if registry.get(name).gguf_arch in _ARCHS})
        raise UnsupportedError(f"architecture '{arch.name}' ({', '.join(arch.hf_architectures)}) is not supported "
                               f"by llama.cpp: no GGUF layout (supported: {', '.join(ok)})")
    return arch.gguf_arch


def check_required(arch: Architecture, config: dict[str, Any], gguf_arch: str, source: str) -> None:
    """Config values the llama.cpp architecture's graph hard-codes (`[gguf] require`): any other
    value would load and run with the wrong math, so it is refused."""
    for key, want in arch.gguf.require.items():
        got = config.get(key, want)
        if got != want:
            raise UnsupportedError(f"{source}: {key} = {json.dumps(got)} is not supported by llama.cpp's "
                                   f"{gguf_arch} architecture (it requires {json.dumps(want)})")


def tensor_type(stage: OutType, shape: tuple[int, ...]) -> tuple[Q, str]:
    """1-D tensors (norms) stay F32; 2-D weights take the stage type, or F16 when their rows do
    not divide into the type's blocks (as llama.cpp's converter falls back)."""
    if len(shape) < 2:
        return Q.F32, ""
    qtype = stage.direct
    assert qtype is not None
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        return Q.F16, f"rows of {shape[-1]} do not divide into {qtype.name} blocks of {block}: F16"
    return qtype, ""


def expert_stacks(reader: TensorReader, arch: Architecture, config: dict[str, Any],
                  n_layers: int) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Per-expert tensor name -> (the stacked tensor's HF-style name, every expert's name in order).
    llama.cpp holds each layer's routed experts of a role as one 3-D tensor; all must exist with
    one shape and dtype."""
    out: dict[str, tuple[str, tuple[str, ...]]] = {}
    for i in range(n_layers):
        for role, names in arch.expert_tensors(i, config).items():
            first = None
            for name in names:
                if name not in reader:
                    raise InputError(f"{reader.files()[0].parent}: tensor '{name}' (expert {role} of layer {i}) "
                                     f"is missing")
                info = reader.info(name)
                first = first or info
                if (info.shape, info.dtype) != (first.shape, first.dtype):
                    raise ShapeError(f"{info.file}: tensor '{name}' is {list(info.shape)} {dtype_name(info.dtype)}, "
                                     f"expert 0 is {list(first.shape)} {dtype_name(first.dtype)}")
            stacked = arch.experts.roles[role].replace(".{e}", "").format(i=i)
            for name in names:
                out[name] = (stacked, tuple(names))
    return out


def plan_tensors(reader: TensorReader, arch: Architecture, config: dict[str, Any], gguf_arch: str,
                 stage: OutType, source: str) -> list[GGUFTensor]:
    """Every source tensor, mapped to its GGUF name by gguf-py's tensor-name map (routed experts:
    one stacked tensor per layer and role)."""
    n_layers = arch.num_layers(config)
    name_map = gguf.get_tensor_name_map(_ARCHS[gguf_arch], n_layers)
    skip = arch.gguf.skip
    keep_f32 = set(arch.gguf.f32)
    # A config without num_key_value_heads has as many kv heads as heads (transformers' default).
    permute = {arch.layer[role]: config.get(key) or (config.get("num_attention_heads")
                                                      if key == "num_key_value_heads" else None)
               for role, key in arch.gguf.rope_permute.items()}
    stacks = expert_stacks(reader, arch, config, n_layers)
    out: list[GGUFTensor] = []
    for name in reader.names():
        if skip and name.endswith(skip):
            continue
        stack: tuple[str, ...] = ()
        if name in stacks:
            stacked, stack = stacks[name]
            if name != stack[0]:
                continue  # made with expert 0
        new = name_map.get_name(stacks[name][0] if stack else name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise UnsupportedError(f"{reader.info(name).file}: tensor '{name}' has no GGUF name for {gguf_arch}")
        info = reader.info(name)
        if dtype_name(info.dtype) not in ("float32", "float16", "bfloat16"):
            raise UnsupportedError(f"{info.file}: tensor '{name}' is {dtype_name(info.dtype)}; "
                                   f"GGUF conversion takes unquantized float checkpoints")
        layer = arch.layer_of(name)
        heads = None
        if layer is not None:
            template = name.replace(f".{layer}.", ".{i}.", 1)
            heads = permute.get(template)
            if template in permute and not heads:
                raise InputError(f"{source}: head count missing, needed to permute '{name}'")
        shape = (len(stack), *info.shape) if stack else tuple(info.shape)
        qtype, note = tensor_type(stage, shape)
        if stack:
            note = "; ".join(filter(None, [f"experts 0-{len(stack) - 1} stacked", note]))
        if new.split(".")[-2] in keep_f32:
            qtype, note = Q.F32, "router, kept F32"
        out.append(GGUFTensor(new, shape, qtype, name, layer, heads, note, stack))
    # Globals before layers, embeddings first: llama.cpp does not care, readers read in order.
    return sorted(out, key=lambda t: (-1 if t.layer is None and "token_embd" in t.name else
                                      t.layer if t.layer is not None else 1 << 30, t.name))


def check_shapes(tensors: list[GGUFTensor], config: dict[str, Any], vocab: Vocab, source: str) -> None:
    """Embedding/output rows must equal the vocabulary: a mismatch makes llama.cpp fail late."""
    for t in tensors:
        if t.name in ("token_embd.weight", "output.weight") and t.shape[0] != len(vocab):
            raise ShapeError(f"{source}: tensor '{t.source}' has {t.shape[0]} rows but vocab_size is {len(vocab)}")
        if t.permute_heads and t.shape[0] % (2 * t.permute_heads):
            raise ShapeError(f"{source}: tensor '{t.source}' rows {t.shape[0]} do not split into {t.permute_heads} heads")


def plan_gguf(src: Path, out: Path, outtype: str = "f16", calibration: str | None = None,
              split_max_size: str | int | None = None, imatrix_chunks: int = 64,
              imatrix: Path | None = None, save_imatrix: Path | None = None,
              threads: int | None = None, allow_nonfinite: bool = False) -> GGUFPlan:
    """Plan converting a Hugging Face LLaMA-family directory to GGUF of the given type.

    The importance matrix comes from `calibration` (a bundled set name or a text path, run through
    the model) or from `imatrix` (a llama.cpp imatrix file); `save_imatrix` keeps a computed one.
    """
    src, out = Path(src), Path(out)
    otype = outtypes.get(outtype)
    if calibration and imatrix:
        raise UnsupportedError("--calibration and --imatrix: give one source of importance matrix")
    if save_imatrix and not calibration:
        raise UnsupportedError("--save-imatrix saves a matrix computed with --calibration; none is computed")
    if imatrix_chunks < 1:
        raise UnsupportedError(f"--imatrix-chunks must be at least 1, got {imatrix_chunks}")
    matrix = calibration or (str(imatrix) if imatrix else None)
    kind = detect(src)
    if kind != "hf":
        raise InputError(f"{src}: a {'Meta original checkpoint' if kind == 'meta' else 'GGUF file'}; "
                         f"GGUF conversion takes a Hugging Face directory"
                         f"{' (convert it first: xquant convert SRC HF_DIR)' if kind == 'meta' else ''}")
    model = open_hf(src)
    source = str(src / "config.json")
    if model.quantization:
        raise UnsupportedError(f"{source}: the model is already quantized "
                               f"({model.quantization.get('quant_method')}); GGUF conversion takes unquantized models")
    arch = model.arch
    gguf_arch = gguf_arch_of(arch)
    config = model.config
    check_required(arch, config, gguf_arch, source)
    if matrix and not otype.uses_imatrix:
        users = ", ".join(n for n in outtypes.known() if outtypes.get(n).uses_imatrix)
        raise UnsupportedError(f"{'--calibration' if calibration else '--imatrix'}: {otype.name} does not use "
                               f"an importance matrix (types that do: {users})")
    if otype.needs_imatrix and not matrix:
        raise UnsupportedError(f"{otype.name} needs an importance matrix: add --calibration NAME|PATH "
                               f"(llama.cpp refuses this type without one)")
    vocab = load_vocab(src, config, arch.gguf.vocab)
    reader = model.tensors
    dtypes = {dtype_name(i.dtype) for i in reader.infos()}
    stage = otype if otype.direct is not None and not (matrix and otype.uses_imatrix) \
        else outtypes.intermediate_for(dtypes)
    tensors = plan_tensors(reader, arch, config, gguf_arch, stage, source)
    check_shapes(tensors, config, vocab, source)
    n_params = sum(t.numel for t in tensors)
    # The file xquant writes carries its own type; llama.cpp's quantizer sets the final one.
    kv = general_kv(src, config, n_params, stage.ftype) + hparams_kv(
        config, gguf_arch, arch.num_layers(config), source, arch.gguf.hparams, arch.gguf.constants)
    max_size = parse_size(split_max_size) if split_max_size else 0
    options = {"outtype": otype.name, "calibration": calibration, "split_max_size": max_size or None,
               "imatrix_chunks": imatrix_chunks if calibration else None,
               "imatrix_file": str(imatrix) if imatrix else None}
    notes = []
    if otype.direct is not None and stage is not otype:
        notes.append(f"{otype.name} with an importance matrix is made by llama.cpp's quantizer (--pure layout)")
    fallback = sum(1 for t in tensors if "do not divide" in t.note)
    if fallback:
        notes.append(f"{fallback} tensors fall back to F16 (row size)")
    return GGUFPlan(src, out, otype, stage, gguf_arch, arch, kv, vocab, tensors, reader, config,
                    Provenance("gguf", options, [src] + ([Path(imatrix)] if imatrix else [])), max_size,
                    calibration, imatrix_chunks if calibration else 0,
                    Path(imatrix) if imatrix else None, Path(save_imatrix) if save_imatrix else None, notes,
                    threads=threads, allow_nonfinite=allow_nonfinite)
