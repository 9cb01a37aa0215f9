"""GPTQ (2/3/4/8-bit), quantized one decoder layer at a time from disk, written in the standard
GPTQ v1 checkpoint layout that transformers/optimum/GPTQModel load.

- core.py: the algorithm (weights + Hessian -> codes, scales, zeros, g_idx); round-to-nearest.
- pack.py: the v1 tensor layout and an independent dequantizer.
- walker.py: layer streaming (one transformers decoder layer on the device, Hessians by hooks).
- moe.py: mixture of experts: routed experts as per-expert Linears, so each one's Hessian comes
  from the tokens routed to it (rarely-routed experts: round-to-nearest, counted in the manifest).
- state.py: the resume state beside the output.
- plan.py / run.py: options, calibration, the output plan; execution and assembly.
- optimum_engine.py: the same through optimum's GPTQQuantizer, as a reference.
- ../evaluate/gptq_reference.py: the dequantized float model a checkpoint stands for.
"""

import logging

# torchao (installed with gptqmodel) registers enums with torch's pytree when transformers imports
# it, and torch 2.14 logs a deprecation warning on stderr for each: noise that would break xquant's
# one-line error output. Only that logger is quieted.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

from .plan import GPTQOptions, GPTQPlan, plan_gptq  # noqa: E402
from .run import GPTQResult, run_gptq  # noqa: E402


def gptq(src, out, options: GPTQOptions | None = None, force: bool = False, resume: bool = False) -> GPTQResult:
    """Plan and run in one call: the library equivalent of `xquant gptq SRC OUT ...`."""
    return run_gptq(plan_gptq(src, out, options or GPTQOptions()), force=force, resume=resume)


__all__ = ["GPTQOptions", "GPTQPlan", "GPTQResult", "gptq", "plan_gptq", "run_gptq"]
