"""`xquant apply-delta`: base + published delta -> the derivative model, one tensor at a time.

Semantics (see styles.py for the two public tools): every tensor of the result is delta + base,
added in float32 and cast to the output dtype (default: the dtype the delta declares in its
config.json). Where the delta's embedding/head has more rows than the base's (an expanded
vocabulary), the base is added to the overlapping rows and the extra rows are the delta's as they
are; in the Ziya style the embedding and head are the delta's whole. The config and tokenizer of
the result are the delta's. Every check of checks.py runs before the output directory is created.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, ShapeError, UnsupportedError
from ..io.dtypes import dtype_name, parse_dtype, parse_size
from ..io.output import Provenance, check_output_path
from ..io.pool import BufferPool
from ..io.readers import TensorReader
from ..io.writer import TensorSpec
from ..model import HFModel, open_hf
from ..pipeline import TensorJob
from .arith import add_delta, one_thread, owns_mapping
from .checks import (Pair, check_base_identity, check_embedding, check_fingerprint, check_shapes,
                     declared_dtype, pair_tensors)
from .record import read_record
from .run import DeltaPlan, check_expected_names, read_expected
from .styles import DEFAULT_STYLE, Style, get_style

SIDE_FILES = ("generation_config.json",)


def _style(requested: str | None, record: dict[str, Any] | None, delta: Path) -> tuple[Style, str]:
    recorded = record.get("style") if record else None
    if requested is None:
        return get_style(recorded or DEFAULT_STYLE), ("recorded in xquant-delta.json" if recorded else "default")
    style = get_style(requested)
    if recorded and get_style(recorded).name != style.name:
        raise InputError(f"{delta}/xquant-delta.json: the delta was made in the {recorded} style; "
                         f"--style {requested} contradicts it")
    return style, "--style"


def _source(p: Pair) -> str:
    if p.whole:
        return "delta (stored whole)"
    if p.extra_rows:
        nb = p.base.shape[0]
        return f"base + delta rows 0-{nb - 1}; delta rows {nb}-{p.other.shape[0] - 1} as they are"
    return "base + delta"


def _job(p: Pair, base: TensorReader, delta: TensorReader, out_dtype: torch.dtype,
         fingerprints: dict[str, Any], base_path: Path, delta_path: Path, pool: BufferPool) -> TensorJob:
    # Both inputs in mappings of their own, read once: their pages go back as the sum moves on.
    release = owns_mapping(delta) and (p.whole or owns_mapping(base))

    def produce() -> torch.Tensor:
        b = None
        if not p.whole:
            b = base.get(p.name)
            check_fingerprint(p.name, b, fingerprints, base_path, delta_path)
        return add_delta(p.name, delta.get(p.name), b, out_dtype, out=pool.empty(p.other.shape, out_dtype),
                         release_inputs=release)

    # A tensor the delta stores whole, already in the output dtype, is copied file to file in-kernel.
    same = p.whole and p.other.dtype == out_dtype
    return TensorJob(TensorSpec(p.name, p.other.shape, out_dtype), produce, p.group, _source(p),
                     passthrough=delta.byte_range(p.name) if same else None)


def _output_pool(pairs: list[Pair], out_dtype: torch.dtype) -> BufferPool:
    """Two output buffers, each the size of the largest output: the one being written and the
    next one, made meanwhile; the producer waits for the writer to hand one back (bounded, as in
    convert: a write taking longer gets fresh memory).

    The pool held four before (one for the embedding and head, three of a layer tensor's size,
    the third for a tensor queued between the two): at 70B widths 0.49 + 3 x 0.44 GiB of buffers,
    with the head's two inputs mapped on top, 3.0 GiB at the peak, and the layer buffers' pages
    were touched further as layers went by (3.3 GiB with two layers). Two of one size keep the
    outputs at 2 x the largest tensor, whatever the depth and however the threads interleave.
    """
    return BufferPool(max((p.other.numel * out_dtype.itemsize for p in pairs), default=0), count=2, wait=5.0)


def _inflight(p: Pair, out_dtype: torch.dtype) -> int:
    """Bytes held while producing one tensor: the delta's, the base's and the result."""
    return p.other.nbytes + (0 if p.whole else p.base.nbytes) + p.other.numel * out_dtype.itemsize


def _check_vocab_config(delta: HFModel, pairs: list[Pair]) -> None:
    vocab = delta.config.get("vocab_size")
    for p in pairs:
        if p.vocab and vocab is not None and p.other.shape[0] != vocab:
            raise ShapeError(f"{delta.path}/config.json: vocab_size is {vocab} but tensor '{p.name}' of the "
                             f"delta has {p.other.shape[0]} rows")


def _content_checks(pairs: list[Pair], style: Style, base: HFModel, delta: HFModel,
                    fingerprints: dict[str, Any], embed_name: str | None) -> list[str]:
    """Fingerprint shapes of every tensor and values of the first layer; the embedding's similarity."""
    notes = []
    if fingerprints:
        for p in pairs:
            rec = fingerprints.get(p.name)
            if rec is not None and list(rec.get("shape", [])) != list(p.base.shape):
                raise InputError(f"{base.path}: tensor '{p.name}' is {'x'.join(map(str, p.base.shape))}, the delta "
                                 f"was made from one of shape {'x'.join(map(str, rec['shape']))}: wrong base")
        first = [p for p in pairs if p.group == 0 or (p.group is None and not p.vocab)]
        for p in first:
            check_fingerprint(p.name, base.tensors.get(p.name), fingerprints, base.path, delta.path)
        base.tensors.release()
        recorded = {r.get("dtype") for r in fingerprints.values()}
        mine = {dtype_name(p.base.dtype) for p in pairs}
        notes.append(f"base fingerprint (xquant-delta.json): {len(first)} tensors checked now, the rest as they stream")
        if recorded != mine:
            notes.append(f"the delta was made from a {'/'.join(sorted(recorded))} base and this one is "
                         f"{'/'.join(sorted(mine))}: the result matches the target to that rounding, not bit for bit")
    embed = next((p for p in pairs if p.name == embed_name), None)
    if embed is not None:
        cos = check_embedding(style, embed, delta.tensors, base.tensors, base.path, delta.path)
        notes.append(f"embedding vs base: mean row cosine {cos:.3f} "
                     f"({'whole copy expected' if embed.whole else 'a difference expected'})")
        base.tensors.release()
        delta.tensors.release()
    return notes


def plan_apply_delta(base: Path, delta: Path, out: Path, dtype: str | None = None, style: str | None = None,
                     expect_sha256: Path | None = None, max_shard_size: str = "5GB",
                     skip_base_check: bool = False) -> DeltaPlan:
    """Plan base + delta -> out; every check that can run before writing has run when this returns."""
    base, delta, out = Path(base), Path(delta), Path(out)
    check_output_path(out, [base, delta], force=True)  # existence is execute's business (--force)
    base_m, delta_m = open_hf(base), open_hf(delta)
    for m, label in ((base_m, "base"), (delta_m, "delta")):
        if m.quantization:
            raise UnsupportedError(f"{m.path}/config.json: the {label} is quantized "
                                   f"({m.quantization.get('quant_method')}); deltas need unquantized weights")
    arch = check_shapes(base_m, delta_m, "delta")
    record = read_record(delta)
    st, style_from = _style(style, record, delta)
    if not skip_base_check:
        check_base_identity(arch, base_m, delta_m, "delta")
    pairs = pair_tensors(arch, st, base_m, delta_m, "delta")
    _check_vocab_config(delta_m, pairs)
    out_dtype = parse_dtype(dtype) if dtype else declared_dtype(delta_m)
    fingerprints = (record or {}).get("base_tensors", {}) if not skip_base_check else {}

    notes = [f"style: {st.name} ({style_from}; {st.tool})",
             f"output dtype: {dtype_name(out_dtype)} ({'--dtype' if dtype else 'declared by the delta'}), "
             f"sums in float32"]
    if skip_base_check:
        notes.append("base checks: shapes only (--skip-base-check)")
    else:
        notes.append("base checks: shapes, config identity fields, content")
        with one_thread():
            notes += _content_checks(pairs, st, base_m, delta_m, fingerprints, arch.globals.get("embed"))

    tokenizer = delta_m.tokenizer_files()
    if not tokenizer:
        if any(p.extra_rows for p in pairs):
            raise InputError(f"{delta}: the delta extends the vocabulary but ships no tokenizer files")
        tokenizer = base_m.tokenizer_files()
        notes.append("the delta ships no tokenizer: the base's is used (same vocabulary size)")
    config = dict(delta_m.config)
    config["dtype"] = dtype_name(out_dtype)
    config.pop("torch_dtype", None)
    size = parse_size(max_shard_size)
    pool = _output_pool(pairs, out_dtype)
    plan = DeltaPlan(
        title=f"apply-delta {delta.name} + {base.name} -> {out.name}",
        out=out,
        jobs=[_job(p, base_m.tensors, delta_m.tensors, out_dtype, fingerprints, base, delta, pool) for p in pairs],
        max_shard_size=size,
        provenance=Provenance("apply-delta", {"style": st.name, "dtype": dtype_name(out_dtype),
                                              "max_shard_size": size, "skip_base_check": skip_base_check,
                                              "expect_sha256": expect_sha256}, [base, delta]),
        json_files={"config.json": config},
        copy_files=[delta / n for n in SIDE_FILES if (delta / n).exists()] + tokenizer,
        readers=[base_m.tensors, delta_m.tensors],
        notes=notes,
        inflight_bytes=max((_inflight(p, out_dtype) for p in pairs), default=0),
        pool=pool,
    )
    if expect_sha256 is not None:
        plan.expected = read_expected(Path(expect_sha256))
        plan.expected_source = Path(expect_sha256)
        check_expected_names(plan.expected, plan, plan.expected_source)
        notes.append(f"expected sha256: {len(plan.expected)} file(s) from {expect_sha256}, checked before the "
                     f"output appears")
    return plan
