"""`xquant convert`: a Meta original or Hugging Face checkpoint -> a Hugging Face safetensors directory."""

from __future__ import annotations

from dataclasses import dataclass

from . import Command, Input, command
from .options import Options, dtype_text, opt, positive, size_text


@dataclass(frozen=True)
class ConvertOptions(Options):
    command = "convert"

    dtype: str | None = opt(None, "float16, bfloat16 or float32 (default: keep the stored dtypes).", check=dtype_text)
    max_shard_size: str = opt("5GB", "Largest output shard (e.g. 5GB, 500MB).", check=size_text)
    context: int | None = opt(None, "Meta input: max_position_embeddings (params.json does not state it; "
                                    "default: the release's).", check=positive)
    allow_nonfinite: bool = opt(False, "Pass NaN/inf weights through instead of refusing them (recorded in the "
                                       "manifest).")


def _plan(inputs, o: ConvertOptions, mode: str):
    from ..convert import plan_convert

    return plan_convert(inputs["src"], inputs["out"], o.dtype, o.max_shard_size, o.context, o.allow_nonfinite)


CONVERT = command(Command(
    name="convert",
    help="Convert to a Hugging Face safetensors directory, one tensor at a time (Meta -> HF, "
         ".bin -> safetensors, re-shard, cast).",
    options=ConvertOptions,
    inputs=(Input("src", "Meta original directory (params.json + consolidated.*.pth) or HF directory."),
            Input("out", "Output Hugging Face directory.")),
    plan=_plan,
    artifact_name=lambda o: f"hf-{o.dtype or 'float16'}",
    source="src",
))
