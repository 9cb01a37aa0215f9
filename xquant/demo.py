"""`xquant demo`: the main job on the embedded tiny model, end to end, in a work directory.

Each step is a library call a user could make themselves; the demo only chains them. Steps whose
output already exists are skipped, so re-running continues where a previous run stopped.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from .console import console, info


def _step(title: str, out: Path, action: Callable[[], object]) -> Path:
    if out.exists():
        info(f"[dim]skip[/] {title}: {out} exists")
        return out
    info(f"[bold cyan]step[/] {title}")
    action()
    return out


def run_demo(workdir: Path) -> dict[str, Path]:
    """Run the demo chain; returns the artifacts by name."""
    from . import tiny
    from .convert import plan_convert
    from .inspect import inspect_path
    from .pipeline import execute
    from .render import render_inspect

    workdir.mkdir(parents=True, exist_ok=True)
    artifacts: dict[str, Path] = {}
    model = tiny.model_dir()
    reference = workdir / "tiny-llama-fp32"
    if not reference.exists():
        shutil.copytree(model, reference)
    artifacts["reference"] = reference
    artifacts["hf-fp16"] = _step("convert to float16", workdir / "tiny-llama-fp16",
                                 lambda: execute(plan_convert(reference, workdir / "tiny-llama-fp16", "float16")))
    for name, path in artifacts.items():
        console.rule(name)
        render_inspect(inspect_path(path))
    return artifacts
