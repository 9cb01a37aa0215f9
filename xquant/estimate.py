"""Sizes and memory for `xquant run --dry-run`: each step planned by its own command's planner.

A step's input is often an earlier step's output (the converted checkpoint, the merged delta),
which does not exist before the run. The earlier step's plan already knows everything a later
planner reads: config.json, the tokenizer files, and every tensor's name, shape and dtype. So the
later step is planned on a stand-in: that directory with the tensor data left as a hole (one
sparse safetensors file whose header is real and whose data reads as zeros and takes no disk).
Every step's output size and peak memory are then the figures its own `--dry-run` prints, from
the code that will run it, instead of a rule of thumb.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .io.safetensors_file import layout
from .pipeline import Plan, write_side_files


@dataclass
class StepEstimate:
    output_bytes: int
    peak_memory: int
    temporary_bytes: int = 0  # written and removed during the step (a GGUF staged for llama.cpp)
    stand_in: bool = False  # planned on a stand-in for an input that does not exist yet


def write_stand_in(plan: Plan, directory: Path) -> Path:
    """The directory `plan` will write, with its tensors' data as a hole (see the module doc)."""
    directory.mkdir(parents=True)
    write_side_files(plan, directory, place=lambda src, dst: os.symlink(src.resolve(), dst))
    specs = [(j.spec.name, tuple(j.spec.shape), j.spec.dtype) for j in plan.jobs]
    head, _ = layout(specs, None)
    data = sum(j.spec.nbytes for j in plan.jobs)
    with open(directory / "model.safetensors", "wb") as f:
        f.write(head)
        f.truncate(len(head) + data)
    return directory


def estimate_steps(steps: list, plan_step: Callable[[Any, Path, Path, bool], Any]) -> dict[str, StepEstimate]:
    """Plan every step (on a stand-in where its input is still to be made); by step name.

    A step's plan is a pipeline `Plan` or a `GGUFPlan`; both give `estimated_output_bytes`,
    `temporary_bytes` and `peak_memory_estimate`.

    `plan_step(step, src, out, stand_in)` returns the step's plan for input `src` and output path
    `out` (inside a scratch directory: the work directory may not exist before the run). A
    planning error is raised as it is: a dry run that finds a bad option or input early has done
    its job.
    """
    out: dict[str, StepEstimate] = {}
    feeds = {s.src for s in steps}
    with tempfile.TemporaryDirectory(prefix="xquant-dry-run-") as tmp:
        stand_ins: dict[Path, Path] = {}
        for i, step in enumerate(steps):
            src = step.src if step.src.exists() else stand_ins.get(step.src)
            if src is None:
                continue  # made by nothing in this recipe and absent: the step's own error says so at run time
            scratch = Path(tmp) / f"{i}-out"
            scratch.mkdir()
            plan = plan_step(step, src, scratch / step.out.name, src != step.src)
            out[step.name] = StepEstimate(plan.estimated_output_bytes(), int(plan.peak_memory_estimate()),
                                          plan.temporary_bytes(), src != step.src)
            if step.out in feeds and not step.out.exists():
                stand_ins[step.out] = write_stand_in(plan, Path(tmp) / f"{i}-{step.name}")
    return out
