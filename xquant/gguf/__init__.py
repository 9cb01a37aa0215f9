"""`xquant gguf`: Hugging Face LLaMA-family checkpoints -> GGUF for llama.cpp, streamed.

Modules: outtypes (the type registry), vocab (tokenizers -> tokenizer.ggml.*), metadata (keys),
plan (the pure plan --dry-run prints), writer (streaming writer and execution), kquant (llama.cpp's
quantizer for k-/i-quants), imatrix (importance matrices: compute, save, load).
"""

from .outtypes import known as known_types
from .plan import GGUFPlan, plan_gguf
from .writer import GGUFResult
from ..pipeline import execute

__all__ = ["GGUFPlan", "GGUFResult", "convert_gguf", "execute", "known_types", "plan_gguf"]


def convert_gguf(src, out, outtype: str = "f16", calibration: str | None = None, *,
                 split_max_size: str | int | None = None, force: bool = False, imatrix_chunks: int = 64,
                 imatrix=None, save_imatrix=None, threads: int | None = None) -> GGUFResult:
    """Plan and write a GGUF file in one call (what the demo and scripts use)."""
    plan = plan_gguf(src, out, outtype, calibration, split_max_size, imatrix_chunks, imatrix, save_imatrix, threads)
    return execute(plan, force=force)
