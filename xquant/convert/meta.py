"""Meta's original LLaMA checkpoints (params.json + consolidated.NN.pth + tokenizer.model) -> Hugging Face.

The plan is built from params.json, the tensor headers of every shard and the tokenizer, all
validated before anything is written (meta_layout.check_shards). Each output tensor's job reads its
slice from every model-parallel shard (memory-mapped), concatenates along the axis the layout names
(or checks that replicated copies are equal), reorders q/k rows to transformers' rotary layout, and
casts. Jobs are grouped by decoder layer, so the pipeline drops the shard mappings after each layer:
at most one layer's input pages are resident at a time.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..arch import get as get_arch
from ..console import info
from ..errors import ShapeError
from ..io.dtypes import dtype_name, human_bytes, parse_dtype
from ..io.finite import check_result
from ..io.output import Provenance
from ..io.readers import TensorReader, meta_weight_files, open_meta_tensors
from ..io.writer import TensorSpec
from ..model import require_dir
from ..pipeline import BASE_MEMORY, Plan, TensorJob
from .meta_layout import MetaTensor, check_shards, hf_rotary_into, meta_tensors, to_hf_rotary
from .meta_params import MetaParams
from .tokenizer import find_tokenizer, hf_tokenizer_files, read_sentencepiece

ARCH = "llama"
# transformers and the tokenizer.json it derives stay resident: a --dry-run of a 32,000-piece model
# peaks at 0.83 GiB against the pipeline's 0.5 GiB base (bench/convert_meta.py).
TOKENIZER_MEMORY = 320 * 2**20


@dataclass
class MetaPlan(Plan):
    """A Plan whose memory estimate accounts for one layer of mapped shard pages."""

    group_bytes: int = 0  # largest input bytes of one group (a decoder layer, or the embedding)
    working_bytes: int = 0  # largest in-flight copies of one job

    def peak_memory_estimate(self) -> int:
        """Resident base + the mapped input pages of one layer (released after it) + one job's copies."""
        return int(BASE_MEMORY + TOKENIZER_MEMORY + self.group_bytes + self.working_bytes)


def _producer(reader: TensorReader, t: MetaTensor, files: list[Path], shape: tuple[int, ...],
              dtype: torch.dtype, allow_nonfinite: Callable[[], bool]):
    """The job of one output tensor: each shard's slice is read, reordered and cast straight into
    its place in the output, so only the output and one slice are in memory besides the mapping.
    Slices are read as views of the mapping (`reader.view`), never modified, so no copy is made
    before the one into the output. NaN/inf are refused (io/finite.py) naming the shard that holds
    them, unless `allow_nonfinite()` (the plan's setting, read when the job runs)."""
    n = len(files)

    def combine(parts: list[torch.Tensor]) -> torch.Tensor:
        if t.dim is None:
            for i in range(1, n):
                if not torch.equal(parts[0], parts[i]):
                    raise ShapeError(f"{files[i]}: replicated tensor '{t.meta_name}' differs from its copy in "
                                     f"{files[0].name}")
            return parts[0].to(dtype)
        if n == 1:
            return (to_hf_rotary(parts[0], t.rotary_heads) if t.rotary_heads else parts[0]).to(dtype)
        out = torch.empty(shape, dtype=dtype)
        offset = 0
        for part in parts:
            size = part.shape[t.dim]
            place = out.narrow(t.dim, offset, size)
            if t.rotary_heads:  # shards hold whole heads, so each slice is reordered on its own
                hf_rotary_into(place, part, t.rotary_heads // n)
            else:
                place.copy_(part)
            offset += size
        return out

    def produce() -> torch.Tensor:
        names = [f"{i}/{t.meta_name}" for i in range(n)]
        parts = [reader.view(name) for name in names]  # views of the mappings: no copies
        out = combine(parts)
        # A result in its sources' dtype holds exactly their values, so when the reader's CRC pass
        # already found every source finite (scanning each chunk while it had it in cache, on its
        # own thread) a second full pass over the result would find nothing new. Otherwise (a
        # cast may overflow; sources not scanned or not finite) the result is scanned here, and
        # check_result names the source that holds NaN/inf, as always.
        copied = all(p.dtype == out.dtype for p in parts)
        if not (copied and all(reader.scanned_finite(name) for name in names)):
            check_result(t.meta_name, out, zip(files, parts), allow_nonfinite())
        return out

    return produce


def plan_meta_to_hf(src: Path, out: Path, dtype: str | None, max_shard_size: int, context: int | None = None,
                    allow_nonfinite: bool = False) -> Plan:
    """Plan the conversion of a Meta LLaMA directory; raises a typed error on any inconsistency."""
    src = require_dir(Path(src))
    params = MetaParams.read(src / "params.json")
    sp = read_sentencepiece(find_tokenizer(src))
    files = meta_weight_files(src)
    reader = open_meta_tensors(src)
    arch = get_arch(ARCH)
    tensors = meta_tensors(arch, params)
    vocab = check_shards(reader, files, arch, params, tensors)
    if sp.pieces > vocab:
        embed = next(t.meta_name for t in tensors if t.role == "embed")
        raise ShapeError(f"{sp.path}: {sp.pieces} pieces, but {files[0].name} {embed} has only {vocab} rows")

    source_dtypes = Counter(reader.info(f"0/{t.meta_name}").dtype for t in tensors)
    target = parse_dtype(dtype) if dtype else None
    config_dtype = target or source_dtypes.most_common(1)[0][0]
    n = len(files)
    plan: MetaPlan | None = None  # made below from the jobs; they read its settings when they run

    def allow() -> bool:
        return plan is not None and plan.allow_nonfinite

    jobs: list[TensorJob] = []
    group_bytes: Counter[int] = Counter()
    working = 0
    for t in tensors:
        infos = [reader.info(f"{i}/{t.meta_name}") for i in range(n)]
        shape = list(infos[0].shape)
        if t.dim is not None:
            shape[t.dim] *= n
        out_dtype = target or infos[0].dtype
        # Globals get their own groups so the embedding's pages are released before layer 0.
        group = t.layer if t.layer is not None else (-1 if t.role == "embed" else params.n_layers)
        jobs.append(TensorJob(TensorSpec(t.hf_name, tuple(shape), out_dtype),
                              _producer(reader, t, files, tuple(shape), out_dtype, allow), group,
                              source=f"{t.meta_name}: {t.describe(n)}"))
        group_bytes[group] += sum(i.nbytes for i in infos)
        # The output, plus a slice and its reordered copy (or two replicated copies being compared).
        working = max(working, jobs[-1].spec.nbytes + 2 * infos[0].nbytes)

    if context is not None:
        why_context = "--context"
    else:
        context, why_context = params.context()
    tokenizer_json, tokenizer_check, ids_equal = hf_tokenizer_files(sp, context)
    if not ids_equal:
        info(f"warning: {tokenizer_check}")
    config = params.hf_config(vocab, context, dtype_name(config_dtype), sp.bos, sp.eos)
    generation = {"bos_token_id": sp.bos, "eos_token_id": sp.eos}
    layer_bytes = max((b for g, b in group_bytes.items() if 0 <= g < params.n_layers), default=0)
    notes = [
        f"{params.n_layers} layers, {params.n_heads} heads, {params.n_kv_heads} kv heads, "
        f"{n} model-parallel shard{'s' if n > 1 else ''}, vocabulary {vocab:,}",
        f"one decoder layer: {human_bytes(layer_bytes)} (in memory at a time)",
        f"max_position_embeddings {context}: {why_context}",
        tokenizer_check,
    ]
    plan = MetaPlan(
        title=f"convert {src.name} (Meta) -> {Path(out).name}",
        out=Path(out),
        jobs=jobs,
        max_shard_size=max_shard_size,
        provenance=Provenance(
            "convert",
            {"dtype": dtype, "max_shard_size": max_shard_size, "source_format": "meta",
             "model_parallel_shards": n},
            [src] + ([sp.path] if sp.path.parent != src else []),
            extra={"tokenizer_check": tokenizer_check},
        ),
        json_files={"config.json": config, "generation_config.json": generation, **tokenizer_json},
        copy_files=[sp.path],
        readers=[reader],
        notes=notes,
        group_bytes=max(group_bytes.values(), default=0),
        working_bytes=working,
        allow_nonfinite=allow_nonfinite,
    )
    return plan
