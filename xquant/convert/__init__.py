"""`xquant convert`: a Meta original or Hugging Face checkpoint -> a Hugging Face safetensors directory."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError, UnsupportedError
from ..io.dtypes import parse_size
from ..model import detect
from ..pipeline import Plan


def plan_convert(src: Path, out: Path, dtype: str | None = None, max_shard_size: str = "5GB",
                 context: int | None = None, allow_nonfinite: bool = False) -> Plan:
    """Plan a conversion; the input kind is detected (Meta params.json or HF config.json).

    `context` sets max_position_embeddings for Meta inputs, whose params.json does not state it
    (by default the release is recognised from its hyper-parameters)."""
    kind = detect(src)
    size = parse_size(max_shard_size)
    if kind == "hf":
        from .hf import plan_hf_copy

        if context is not None:
            raise UnsupportedError("--context applies to Meta checkpoints; an HF config.json already states it")
        return plan_hf_copy(Path(src), Path(out), dtype, size, allow_nonfinite)
    if kind == "meta":
        from .meta import plan_meta_to_hf

        if context is not None and context < 1:
            raise UnsupportedError(f"--context {context}: must be a positive number of tokens")
        return plan_meta_to_hf(Path(src), Path(out), dtype, size, context, allow_nonfinite)
    raise InputError(f"{src}: GGUF files cannot be converted back to Hugging Face format")
