"""The GPTQ layer walk, the executor's `prepare` for a GPTQ plan (pipeline.execute).

Layer after layer is quantized into the resume state folder (state.py): each layer's packed
tensors and the activations entering the next one are committed before the next layer starts, so
an interrupted run continues where it stopped. The executor then streams the plan's tensors
(packed layers from the state, everything else from the source) into the artifact and the plan
removes the state. This module does not import the plan (the plan calls into it).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ...console import info, progress
from .result import GPTQResult
from .state import ResumeState
from .walker import LayerWalker

if TYPE_CHECKING:
    from .plan import GPTQPlan


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
