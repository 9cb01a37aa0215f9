"""`xquant gptq`: GPTQ 2/3/4/8-bit, one decoder layer at a time, in the GPTQ v1 checkpoint layout.
Its options are GPTQOptions (gptq_options.py), which the planner and walker read too."""

from __future__ import annotations

from . import Command, Input, command
from .gptq_options import GPTQOptions


def _plan(inputs, o: GPTQOptions, mode: str):
    from ..quant.gptq.plan import plan_gptq

    return plan_gptq(inputs["model"], inputs["out"], o)


def _run(plan, force: bool, resume: bool):
    from ..quant.gptq.run import run_gptq

    return run_gptq(plan, force=force, resume=resume)


def _show(result) -> None:
    from ..render import render_gptq

    render_gptq(result)


GPTQ = command(Command(
    name="gptq",
    help="GPTQ 2/3/4/8-bit, one decoder layer at a time from disk, in the standard GPTQ v1 checkpoint layout.",
    options=GPTQOptions,
    inputs=(Input("model", "Unquantized Hugging Face model directory (with its tokenizer)."),
            Input("out", "Output GPTQ checkpoint directory.")),
    plan=_plan, run=_run, show=_show,
    artifact_name=lambda o: f"gptq-{o.bits}bit-g{o.group_size}",
    resumable=True,
))
