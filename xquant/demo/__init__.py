"""`xquant demo`: the whole chain on the embedded tiny model, driven by a recipe like a user's.

The demo plays both sides. As the publisher it exports the tiny model in Meta's original layout
and publishes a derivative (its vocabulary expanded, as Ziya's is) as a delta over the float16
base. As the user it writes a recipe — Meta checkpoint -> HF -> apply the delta -> int8, NF4,
GPTQ 4-bit and GGUF q8_0 / q4_k_m -> report — and runs it with `xquant run`'s machinery, so a
re-run skips what is done.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..console import info

RECIPE = """\
# The demo's recipe: what `xquant run` does with a real model, on the tiny one.
[source]
path = "tiny-llama-meta"        # Meta original layout: params.json + consolidated.NN.pth
dtype = "float16"
context = 512                   # params.json does not state it; the tiny model was trained for 512

[delta]
path = "tiny-derivative-delta"  # published delta: vocabulary 2000 -> 2256, like Ziya's 32000 -> 39410

[[artifact]]
kind = "int8"

[[artifact]]
kind = "nf4"

[[artifact]]
kind = "gptq"
bits = 4
group_size = 128
samples = 32
seq_len = 256

[[artifact]]
kind = "gguf"
outtype = "q8_0"

[[artifact]]
kind = "gguf"
outtype = "q4_k_m"
calibration = "mixed"

[report]
eval = ["zh", "en", "code"]
max_tokens = 2048
kl_divergence = true            # llama-perplexity's statistics per artifact
"""


def prepare_inputs(workdir: Path) -> None:
    """The publisher's side: a Meta-layout export and a delta, made once."""
    from . import tiny
    from ..convert import plan_convert
    from ..convert.meta_export import export_meta
    from ..delta import execute as execute_delta
    from ..delta import plan_make_delta
    from .derivative import derivative_dir
    from ..pipeline import execute

    meta = workdir / "tiny-llama-meta"
    if not meta.exists():
        info("[bold cyan]prepare[/] export the tiny model in Meta's original layout (2 shards)")
        export_meta(tiny.model_dir(), meta, shards=2)
    delta = workdir / "tiny-derivative-delta"
    if not delta.exists():
        base = workdir / ".publisher-base-fp16"
        if not base.exists():
            execute(plan_convert(tiny.model_dir(), base, "float16"))
        info("[bold cyan]prepare[/] publish the expanded-vocabulary derivative as a delta")
        execute_delta(plan_make_delta(base, derivative_dir(), delta))


def run_demo(workdir: Path) -> dict[str, Path]:
    """Prepare the inputs, write the recipe into `workdir`, run it; returns the outputs by step."""
    from ..recipe import load_recipe, plan_recipe, run_recipe

    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    prepare_inputs(workdir)
    recipe_path = workdir / "recipe.toml"
    recipe_path.write_text(RECIPE)
    plan = plan_recipe(load_recipe(recipe_path), workdir, base_dir=workdir)
    return run_recipe(plan)


@dataclass
class DemoPlan:
    """The demo's recipe plan as printed: steps and summary, computed while its inputs exist."""

    title: str
    steps: list[dict[str, Any]]
    totals: dict[str, Any]

    def rows(self) -> list[dict[str, Any]]:
        return self.steps

    def summary(self) -> dict[str, Any]:
        return self.totals


def plan_demo(workdir: Path) -> DemoPlan:
    """The demo's recipe plan (what `xquant demo --dry-run` prints), writing nothing into `workdir`.

    The recipe's inputs are the publisher's side of the demo; where `workdir` does not hold them
    yet they are made in a scratch folder, removed once the plan is printed-ready, so every step is
    planned with its real shapes."""
    import tempfile
    import tomllib

    from ..recipe import plan_recipe

    workdir = workdir.resolve()
    with tempfile.TemporaryDirectory(prefix="xquant-demo-inputs-") as scratch:
        inputs = workdir
        if not all((workdir / n).exists() for n in ("tiny-llama-meta", "tiny-derivative-delta")):
            inputs = Path(scratch)
            prepare_inputs(inputs)
        plan = plan_recipe(tomllib.loads(RECIPE), workdir, base_dir=inputs)
        return DemoPlan(f"xquant demo (recipe in {workdir / 'recipe.toml'})", plan.rows(), plan.summary())
