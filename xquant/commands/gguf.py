"""`xquant gguf`: Hugging Face LLaMA-family checkpoints -> GGUF for llama.cpp, streamed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import Command, Input, command
from .options import Options, at_least, opt, positive, size_text


def _outtype(value: str) -> str | None:
    from ..gguf import outtypes

    return None if value.lower() in outtypes.known() else f"unknown GGUF type (known: {', '.join(outtypes.known())})"


@dataclass(frozen=True)
class GGUFOptions(Options):
    command = "gguf"

    outtype: str = opt("f16", "f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 (written directly); q2_k q3_k_m q4_k_s "
                              "q4_k_m q5_k_m q6_k iq4_xs ... (llama.cpp).", check=_outtype)
    calibration: str | None = opt(None, "Compute an importance matrix from this text: bundled set (zh, en, code, "
                                        "mixed) or a path.")
    imatrix: Path | None = opt(None, "Use this llama.cpp imatrix file instead.")
    save_imatrix: Path | None = opt(None, "Also save the computed importance matrix (llama.cpp GGUF imatrix format).")
    imatrix_chunks: int = opt(64, "Calibration chunks (≤ 512 tokens each).", check=at_least(1))
    split_max_size: str | None = opt(None, "Split into files of at most this size (e.g. 50G), named as "
                                           "llama.cpp's gguf-split.", check=size_text)
    threads: int | None = opt(None, "Threads for quantizing (default: all).", check=positive, fingerprint=False)
    allow_nonfinite: bool = opt(False, "Pass NaN/inf weights through instead of refusing them (recorded in the "
                                       "manifest).")

    def check(self) -> None:
        if self.calibration and self.imatrix:
            from ..errors import UnsupportedError

            raise UnsupportedError("--calibration and --imatrix: give one source of importance matrix")


def _plan(inputs, o: GGUFOptions, mode: str):
    from ..gguf import plan_gguf

    return plan_gguf(inputs["model"], inputs["out"], o.outtype, o.calibration, o.split_max_size, o.imatrix_chunks,
                     o.imatrix, o.save_imatrix, o.threads, o.allow_nonfinite)


def _show(result) -> None:
    from ..console import console

    for path in result.paths:
        console.print(f"[green]wrote[/] {path} ({result.outtype}, {path.stat().st_size:,} bytes)")


GGUF = command(Command(
    name="gguf",
    help="Convert to GGUF for llama.cpp, streamed tensor by tensor; k-/i-quants by llama.cpp's quantizer.",
    options=GGUFOptions,
    inputs=(Input("model", "Hugging Face model directory (LLaMA family)."),
            Input("out", "Output .gguf file (split: OUT-00001-of-0000N.gguf).")),
    plan=_plan, show=_show,
    artifact_name=lambda o: f"model-{o.outtype}.gguf",
))
