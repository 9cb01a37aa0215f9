"""Executing a GPTQ plan: walk the decoder layers (resumably), then assemble the artifact.

Phase 1 quantizes layer after layer into the resume state folder (state.py); phase 2 streams
the plan's tensors (packed layers from the state, everything else from the source) through the
shared pipeline writer into an atomic output directory, then removes the state.
"""

from __future__ import annotations

import time
from typing import Any

from ...console import info, progress
from ...errors import UnsupportedError
from ...pipeline import execute
from .plan import GPTQPlan
from .result import GPTQResult
from .state import ResumeState
from .walker import LayerWalker


def run_gptq(plan: GPTQPlan, force: bool = False, resume: bool = False) -> GPTQResult:
    """Quantize and write the artifact described by `plan` (through the one executor)."""
    if plan.options.engine == "optimum":
        if resume:
            raise UnsupportedError("--resume: the optimum engine quantizes the whole model in memory and cannot resume")
        from .optimum_engine import run_optimum

        return run_optimum(plan, force)
    return execute(plan, force=force, resume=resume)


def walk(plan: GPTQPlan, force: bool, resume: bool) -> ResumeState:
    """The executor's `prepare` for GPTQ: quantize every layer into the resume state (continuing
    a saved one with `resume`) and record the per-layer statistics in the provenance."""
    plan.started = time.perf_counter()
    state = ResumeState.start(plan.out, plan.fingerprint(), plan.num_layers, resume, force)
    plan.state = state
    start = state.next_layer
    plan.resumed_at = start or None
    if start and start <= plan.num_layers:
        info(f"resuming {state.path.name}: layers 0-{start - 1} already quantized")
    _walk(plan, state)
    plan.provenance.extra["gptq"] = {"engine": "xquant", "resumed_at_layer": start or None,
                                     "layers": state.stats}
    if plan.experts:
        plan.provenance.extra["gptq"]["experts"] = expert_summary(state.stats, plan.options.min_expert_tokens)
    return state


def result(plan: GPTQPlan) -> GPTQResult:
    return GPTQResult(plan.out.resolve(), "xquant", round(time.perf_counter() - plan.started, 2), plan.state.stats,
                      plan.resumed_at, plan.provenance.extra["gptq"].get("experts"))


def expert_summary(stats: list[dict[str, Any]], min_tokens: int) -> dict[str, Any]:
    """The manifest's `gptq.experts`: how many routed experts were rounded to nearest (fewer than
    `min_tokens` calibration tokens routed to them), of how many; per layer, the token count of
    each expert (the layers' own stats also say which ones)."""
    layers = [s for s in stats if "experts" in s]
    rtn = sum(e["rtn"] for s in layers for e in s["experts"])
    total = sum(len(s["experts"]) for s in layers)
    return {"total": total, "rtn": rtn, "min_tokens": min_tokens,
            "per_layer": [{"layer": s["layer"], "rtn": [i for i, e in enumerate(s["experts"]) if e["rtn"]],
                           "tokens": [e["tokens"] for e in s["experts"]]} for s in layers]}


def _walk(plan: GPTQPlan, state: ResumeState) -> None:
    """Quantize the layers the state has not finished yet, committing each one."""
    o = plan.options
    if state.next_layer >= plan.num_layers:
        return
    reader = plan.model.tensors
    walker = LayerWalker(plan.model.config, plan.model.arch, reader, o.spec(), o.true_sequential, o.device,
                         plan.act_dtype, o.min_expert_tokens)
    if state.has_inputs():
        inputs = state.load_inputs()
    else:
        inputs = walker.embed(plan.calibration.windows)
        state.save_inputs(0, inputs)
    with progress(f"gptq {o.bits}-bit", total=plan.num_layers - state.next_layer) as advance:
        for i in range(state.next_layer, plan.num_layers):
            result = walker.run_layer(i, inputs)
            state.commit_layer(i, result.tensors, result.outputs, result.stats)
            inputs = result.outputs
            del result
            reader.release()
            advance(1, description=f"gptq layer {i + 1}/{plan.num_layers}")
