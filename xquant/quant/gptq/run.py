"""Running a GPTQ plan: the layer-streamed engine through the one executor (its `prepare` is the
resumable layer walk, walk.py), or the optimum reference engine."""

from __future__ import annotations

from ...errors import UnsupportedError
from ...pipeline import execute
from .plan import GPTQPlan
from .result import GPTQResult


def run_gptq(plan: GPTQPlan, force: bool = False, resume: bool = False) -> GPTQResult:
    """Quantize and write the artifact described by `plan` (through the one executor)."""
    if plan.options.engine == "optimum":
        if resume:
            raise UnsupportedError("--resume: the optimum engine quantizes the whole model in memory and cannot resume")
        from .optimum_engine import run_optimum

        return run_optimum(plan, force)
    return execute(plan, force=force, resume=resume)
