"""`xquant make-delta`: target - base -> a delta that FastChat, Fengshenbang and xquant can apply.

Differences are taken in float32 and stored as `--dtype` (default float32). Both public tools
store float16 deltas, which are half the size but cannot reproduce a float16 target bit for bit
(target - base needs more mantissa than float16 has); a float32 delta of float16/bfloat16 models
reproduces them exactly, because float32 holds their difference exactly. Every tensor's round
trip is replayed while it is written and recorded in xquant-delta.json with a fingerprint of the
base, so apply-delta can tell the right base from a wrong one by content.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, UnsupportedError
from ..io.dtypes import dtype_name, parse_dtype, parse_size
from ..io.output import Provenance, check_output_path
from ..io.readers import TensorReader
from ..io.writer import TensorSpec
from ..model import open_hf
from ..pipeline import TensorJob
from .arith import RoundTrip, subtract_base
from .checks import Pair, check_base_identity, check_shapes, declared_dtype, fingerprint, pair_tensors
from .record import RECORD_NAME, new_record
from .run import DeltaPlan
from .styles import DEFAULT_STYLE, get_style

SIDE_FILES = ("generation_config.json",)


def _job(p: Pair, base: TensorReader, target: TensorReader, store: torch.dtype, record: dict[str, Any]) -> TensorJob:
    def produce() -> torch.Tensor:
        b = base.get(p.name)
        record["base_tensors"][p.name] = fingerprint(b)
        delta, trip = subtract_base(p.name, target.get(p.name), None if p.whole else b, store)
        del b
        total = record["round_trip"]
        summed = RoundTrip(total["elements"], total["inexact_elements"], total["max_abs_error"],
                           total["signed_zero_elements"])
        summed.add(trip)
        total.update(elements=summed.elements, inexact_elements=summed.inexact, max_abs_error=summed.max_abs_error,
                     signed_zero_elements=summed.signed_zeros, exact=summed.inexact == 0)
        if trip.inexact and len(total["inexact_tensors"]) < 20:
            total["inexact_tensors"].append(p.name)
        return delta

    if p.whole:
        source = "target (stored whole)"
    elif p.extra_rows:
        nb = p.base.shape[0]
        source = f"target - base rows 0-{nb - 1}; target rows {nb}-{p.other.shape[0] - 1} as they are"
    else:
        source = "target - base"
    return TensorJob(TensorSpec(p.name, p.other.shape, store), produce, p.group, source)


def plan_make_delta(base: Path, target: Path, out: Path, style: str | None = None, dtype: str | None = None,
                    max_shard_size: str = "5GB", skip_base_check: bool = False) -> DeltaPlan:
    """Plan target - base -> out (a delta directory with the target's config and tokenizer)."""
    base, target, out = Path(base), Path(target), Path(out)
    check_output_path(out, [base, target], force=True)
    base_m, target_m = open_hf(base), open_hf(target)
    for m, label in ((base_m, "base"), (target_m, "target")):
        if m.quantization:
            raise UnsupportedError(f"{m.path}/config.json: the {label} is quantized; deltas need unquantized weights")
    arch = check_shapes(base_m, target_m, "target")
    st = get_style(style or DEFAULT_STYLE)
    if not skip_base_check:
        check_base_identity(arch, base_m, target_m, "target")
    pairs = pair_tensors(arch, st, base_m, target_m, "target")
    store = parse_dtype(dtype) if dtype else torch.float32
    target_dtype = declared_dtype(target_m)
    tokenizer = target_m.tokenizer_files()
    if not tokenizer and any(p.extra_rows for p in pairs):
        raise InputError(f"{target}: the target extends the vocabulary but has no tokenizer files to ship")
    record = new_record(st.name, base, target, dtype_name(target_dtype), dtype_name(store))
    size = parse_size(max_shard_size)
    notes = [f"style: {st.name} ({st.tool})",
             f"delta dtype: {dtype_name(store)} (target {dtype_name(target_dtype)}); differences in float32",
             f"{RECORD_NAME}: base fingerprint and round-trip check, filled while writing"]
    if store.itemsize < 4:
        notes.append(f"a {dtype_name(store)} delta is what the public tools publish; it does not reproduce "
                     f"the target bit for bit")
    return DeltaPlan(
        title=f"make-delta {target.name} - {base.name} -> {out.name}",
        out=out,
        jobs=[_job(p, base_m.tensors, target_m.tensors, store, record) for p in pairs],
        max_shard_size=size,
        provenance=Provenance("make-delta", {"style": st.name, "dtype": dtype_name(store), "max_shard_size": size,
                                             "skip_base_check": skip_base_check}, [base, target]),
        # The config stays the target's (dtype included): apply-delta's default output dtype.
        json_files={"config.json": dict(target_m.config), RECORD_NAME: record},
        copy_files=[target / n for n in SIDE_FILES if (target / n).exists()] + tokenizer,
        readers=[base_m.tensors, target_m.tensors],
        notes=notes,
        # target + base + delta + the replayed target of the round-trip check
        inflight_bytes=max((2 * p.other.nbytes + p.base.nbytes + p.other.numel * store.itemsize for p in pairs),
                           default=0),
        record=record,
    )
