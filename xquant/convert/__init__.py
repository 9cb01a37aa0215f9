"""`xquant convert`: a Meta original or Hugging Face checkpoint -> a Hugging Face safetensors directory."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..io.dtypes import parse_size
from ..model import detect
from ..pipeline import Plan


def plan_convert(src: Path, out: Path, dtype: str | None = None, max_shard_size: str = "5GB") -> Plan:
    """Plan a conversion; the input kind is detected (Meta params.json or HF config.json)."""
    kind = detect(src)
    size = parse_size(max_shard_size)
    if kind == "hf":
        from .hf import plan_hf_copy

        return plan_hf_copy(Path(src), Path(out), dtype, size)
    if kind == "meta":
        from .meta import plan_meta_to_hf

        return plan_meta_to_hf(Path(src), Path(out), dtype, size)
    raise InputError(f"{src}: GGUF files cannot be converted back to Hugging Face format")
