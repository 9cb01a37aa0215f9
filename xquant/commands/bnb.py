"""`xquant int8` and `xquant nf4`: bitsandbytes checkpoints written tensor by tensor."""

from __future__ import annotations

from dataclasses import dataclass

from . import Command, Input, command
from .options import Options, dtype_text, opt, size_text

_SKIP_HELP = "Comma-separated modules kept in full precision; replaces the default (lm_head)."
_INPUTS = (Input("model", "Hugging Face model directory (float16, bfloat16 or float32)."),
           Input("out", "Output directory (loads with from_pretrained, no extra arguments)."))


def _non_negative(value: float) -> str | None:
    return None if value >= 0 else "must be >= 0"


@dataclass(frozen=True)
class Int8Options(Options):
    command = "int8"

    threshold: float = opt(6.0, "LLM.int8 outlier threshold, used at inference.", check=_non_negative)
    skip_modules: str | None = opt(None, _SKIP_HELP)
    max_shard_size: str = opt("5GB", "Largest output shard (e.g. 5GB, 500MB).", check=size_text)


@dataclass(frozen=True)
class NF4Options(Options):
    command = "nf4"

    compute_dtype: str | None = opt(None, "Dtype bitsandbytes computes in at inference (default float32, "
                                          "as transformers).", check=dtype_text)
    double_quant: bool = opt(False, "Also quantize the block scales (QLoRA's double quantization).",
                             flag="--double-quant/--no-double-quant")
    skip_modules: str | None = opt(None, _SKIP_HELP)
    max_shard_size: str = opt("5GB", "Largest output shard (e.g. 5GB, 500MB).", check=size_text)


def _int8(inputs, o: Int8Options, mode: str):
    from ..quant.bnb import plan_int8

    return plan_int8(inputs["model"], inputs["out"], o.threshold, o.skip_modules, o.max_shard_size)


def _nf4(inputs, o: NF4Options, mode: str):
    from ..quant.bnb import plan_nf4

    return plan_nf4(inputs["model"], inputs["out"], o.compute_dtype, o.double_quant, o.skip_modules,
                    o.max_shard_size)


INT8 = command(Command(
    name="int8", help="LLM.int8 (bitsandbytes) checkpoint, written tensor by tensor without building the model.",
    options=Int8Options, inputs=_INPUTS, plan=_int8, artifact_name=lambda o: "int8"))

NF4 = command(Command(
    name="nf4", help="4-bit NormalFloat (bitsandbytes NF4) checkpoint, written tensor by tensor without "
                     "building the model.",
    options=NF4Options, inputs=_INPUTS, plan=_nf4, artifact_name=lambda o: "nf4"))
