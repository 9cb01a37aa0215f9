"""HF -> HF: re-shard, cast to another dtype, or turn legacy pytorch_model.bin into safetensors."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UnsupportedError
from ..io.dtypes import FLOAT_DTYPES, dtype_name, parse_dtype
from ..io.finite import cast_file_into, cast_into, check_file_range, check_result
from ..io.pool import BufferPool
from ..io.output import Provenance
from ..io.writer import TensorSpec
from ..model import open_hf
from ..pipeline import Plan, TensorJob

SIDE_FILES = ("generation_config.json",)


def cast_job(reader, name: str, dtype: torch.dtype | None, group: int | None, plan: Plan) -> TensorJob:
    """A job copying one tensor, cast to dtype when it is floating point; NaN/inf refused unless
    `plan.allow_nonfinite`.

    An unchanged tensor is copied file to file in the kernel; its bytes are first scanned for
    NaN/inf on the producer thread (read in pieces into one reused buffer: no mapping, nothing held),
    while the writer is still busy with the previous tensor. A cast is made into one of the plan's
    pooled buffers, block by block on every core, straight from windows of the source file where
    the reader has its bytes in one piece; each block is scanned for NaN/inf as it is made
    (io/finite.py `cast_into`), so no second pass over the tensor is needed.
    """
    info = reader.info(name)
    out_dtype = dtype if (dtype is not None and info.dtype in FLOAT_DTYPES) else info.dtype
    same = out_dtype == info.dtype

    def produce() -> torch.Tensor:
        if same:  # a reader without byte ranges (pickles): its tensor as it is
            src = reader.view(name)
            check_result(name, src, [(info.file, src)], plan.allow_nonfinite)
            return src
        pool = plan.pool
        out = pool.empty(info.shape, out_dtype) if pool is not None else torch.empty(info.shape, dtype=out_dtype)
        where = reader.byte_range(name)
        if where is not None:
            finite = cast_file_into(where[0], where[1], info.dtype, out)
        else:
            finite = cast_into(reader.view(name), out)
        if not finite:  # raises unless allowed, naming NaN/inf in the source or the overflow
            check_result(name, out, [(info.file, reader.view(name))], plan.allow_nonfinite)
        return out

    through = reader.byte_range(name) if same else None

    def scan() -> None:
        check_file_range(name, through[0], through[1], info.nbytes, info.dtype, plan.allow_nonfinite)

    return TensorJob(TensorSpec(name, info.shape, out_dtype), produce, group, source=dtype_name(info.dtype),
                     passthrough=through, check=scan if through is not None else None)


def plan_hf_copy(src: Path, out: Path, dtype: str | None, max_shard_size: int, allow_nonfinite: bool = False) -> Plan:
    model = open_hf(src)
    if model.quantization:
        raise UnsupportedError(f"{src}/config.json: the model is already quantized "
                               f"({model.quantization.get('quant_method')}); convert takes unquantized models")
    arch = model.arch
    target = parse_dtype(dtype) if dtype else None
    config = dict(model.config)
    if target is not None:
        config["dtype"] = dtype_name(target)
        config.pop("torch_dtype", None)
    plan = Plan(
        title=f"convert {src.name} -> {out.name}",
        out=out,
        jobs=[],
        max_shard_size=max_shard_size,
        provenance=Provenance("convert", {"dtype": dtype, "max_shard_size": max_shard_size,
                                          "source_format": "huggingface"}, [src]),
        json_files={"config.json": config},
        copy_files=[src / n for n in SIDE_FILES if (src / n).exists()] + model.tokenizer_files(),
        readers=[model.tensors],
        allow_nonfinite=allow_nonfinite,
    )
    plan.jobs = [cast_job(model.tensors, n, target, arch.layer_of(n), plan) for n in model.tensors.names()]
    cast = [j.spec.nbytes for j in plan.jobs if j.passthrough is None]
    if cast:
        # Reused output buffers: each page is touched once per run, not once per tensor. Two,
        # the one being written and the next one, made meanwhile: the cast outruns the writer,
        # so a third in flight would only add a tensor's size to the peak. The wait is bounded,
        # should the writer stop (a write taking longer gets fresh memory, as without a pool).
        plan.pool = BufferPool(max(cast), count=2, wait=5.0)
    return plan
