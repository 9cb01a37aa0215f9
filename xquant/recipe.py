"""`xquant run RECIPE.toml`: the whole chain from one recipe, each step run once.

A recipe names a source (Meta or HF directory), an optional delta, and the artifacts wanted.
The runner plans the chain as a list of steps (a pure value that `--dry-run` prints with disk and
memory estimates), then runs each step through the same library calls the commands use. A step
whose output exists and was made from the same inputs with the same options (recorded in a small
step file beside it) is skipped, so re-running after a crash continues where it stopped.

Example:

    [source]
    path = "llama-13b-meta"          # Meta original or HF directory
    dtype = "float16"

    [delta]                           # optional: Ziya-style delta over the source
    path = "ziya-delta"

    [[artifact]]
    kind = "int8"

    [[artifact]]
    kind = "gptq"
    bits = 4
    group_size = 128

    [[artifact]]
    kind = "gguf"
    outtype = "q4_k_m"

    [report]
    eval = ["zh", "en", "code"]
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .console import info
from .errors import CorruptFileError, InputError, UnsupportedError
from .io.dtypes import human_bytes
from .io.output import read_manifest

STEP_FILE = ".xquant-step-{name}.json"


@dataclass(frozen=True)
class StepKind:
    """How a recipe step is planned and carried out: the same library calls the commands make.

    `plan(src, out, options, estimate)` returns the command's plan (a pure value: output tensors,
    sizes, memory estimate); `estimate=True` when it is only for `--dry-run` on a stand-in input
    (see estimate.py), so checks that read tensor values are skipped. `run(plan, force)` executes it.
    """

    plan: Callable[[Path, Path, dict[str, Any], bool], Any]
    run: Callable[[Any, bool], None]
    default_name: Callable[[dict], str]


_STEPS: dict[str, StepKind] = {}


def _execute(plan: Any, force: bool) -> None:
    from .pipeline import execute

    execute(plan, force=force)


def _execute_gguf(plan: Any, force: bool) -> None:
    from .gguf.writer import execute

    execute(plan, force=force)


def _run_gptq(plan: Any, force: bool) -> None:
    from .quant.gptq.run import run_gptq

    run_gptq(plan, force=force, resume=True)


def step_kind(kind: str, default_name: Callable[[dict], str], run: Callable[[Any, bool], None] = _execute):
    def deco(plan_fn):
        _STEPS[kind] = StepKind(plan_fn, run, default_name)
        return plan_fn

    return deco


@step_kind("hf", lambda o: f"hf-{o.get('dtype', 'float16')}")
def _hf(src: Path, out: Path, o: dict[str, Any], estimate: bool):
    from .convert import plan_convert

    return plan_convert(src, out, o.get("dtype"), o.get("max_shard_size", "5GB"), o.get("context"))


@step_kind("int8", lambda o: "int8")
def _int8(src: Path, out: Path, o: dict[str, Any], estimate: bool):
    from .quant.bnb import plan_int8

    return plan_int8(src, out, threshold=o.get("threshold", 6.0), skip_modules=o.get("skip_modules"))


@step_kind("nf4", lambda o: "nf4")
def _nf4(src: Path, out: Path, o: dict[str, Any], estimate: bool):
    from .quant.bnb import plan_nf4

    return plan_nf4(src, out, compute_dtype=o.get("compute_dtype"), double_quant=o.get("double_quant", False),
                    exact=not estimate)


@step_kind("gguf", lambda o: f"model-{o.get('outtype', 'f16')}.gguf", run=_execute_gguf)
def _gguf(src: Path, out: Path, o: dict[str, Any], estimate: bool):
    from .gguf.plan import plan_gguf

    imatrix = o.get("imatrix")
    return plan_gguf(src, out, o.get("outtype", "f16"), o.get("calibration"),
                     imatrix_chunks=o.get("imatrix_chunks", 64), imatrix=Path(imatrix) if imatrix else None)


@step_kind("gptq", lambda o: f"gptq-{o.get('bits', 4)}bit-g{o.get('group_size', 128)}", run=_run_gptq)
def _gptq(src: Path, out: Path, o: dict[str, Any], estimate: bool):
    from .quant.gptq.plan import GPTQOptions, plan_gptq

    opts = dict(o)
    if "calibration" in opts:
        cal = opts["calibration"]
        opts["calibration"] = tuple(cal) if isinstance(cal, list) else (cal,)
    try:
        options = GPTQOptions(**opts)
    except TypeError as e:
        raise UnsupportedError(f"recipe: gptq artifact: {e}") from None
    return plan_gptq(src, out, options)


@step_kind("apply-delta", lambda o: "merged")
def _apply_delta(src: Path, out: Path, o: dict[str, Any], estimate: bool):
    from .delta import plan_apply_delta

    # On a stand-in base (estimate) the values are placeholders: only shapes and config are checked.
    return plan_apply_delta(src, Path(o["delta"]), out, dtype=o.get("dtype"), style=o.get("style"),
                            expect_sha256=Path(o["expect_sha256"]) if o.get("expect_sha256") else None,
                            skip_base_check=estimate)


@dataclass
class Step:
    name: str
    kind: str
    src: Path
    out: Path
    options: dict[str, Any]

    def fingerprint(self, src_digest: str) -> str:
        blob = json.dumps({"kind": self.kind, "options": self.options, "src": src_digest}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class RecipePlan:
    workdir: Path
    source: Path
    steps: list[Step]
    report: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)
    _estimates: dict[str, Any] | None = field(default=None, repr=False)

    title = "xquant run"

    def estimates(self) -> dict[str, Any]:
        """Each step's output size and peak memory from its own planner (estimate.py); cached."""
        if self._estimates is None:
            from .estimate import estimate_steps

            self._estimates = estimate_steps(
                self.steps, lambda step, src, out, stand_in: _STEPS[step.kind].plan(src, out, step.options, stand_in))
        return self._estimates

    def rows(self) -> list[dict[str, Any]]:
        est = self.estimates()
        rows = []
        for s in self.steps:
            e = est.get(s.name)
            rows.append({"step": s.name, "kind": s.kind, "from": s.src.name, "to": str(s.out),
                         "options": json.dumps(s.options),
                         "size": human_bytes(e.output_bytes) if e else "?",
                         "peak memory": human_bytes(e.peak_memory) if e else "?",
                         "status": "done" if step_done(s) else "to do"})
        return rows

    def summary(self) -> dict[str, Any]:
        from .inspect import inspect_path

        try:
            size = inspect_path(self.source)["size_on_disk"]
        except Exception:  # noqa: BLE001 - the source's own error comes from its step
            size = 0
        est = self.estimates()
        outputs = sum(e.output_bytes for e in est.values())
        temporary = max((e.temporary_bytes for e in est.values()), default=0)
        out = {"workdir": str(self.workdir), "steps": len(self.steps), "source size": human_bytes(size),
               "disk estimate": f"{human_bytes(outputs)} of outputs"
                                + (f" + up to {human_bytes(temporary)} temporary" if temporary else "")
                                + f" (source: {human_bytes(size)} more if it is on the same disk)"}
        if est:
            name, top = max(est.items(), key=lambda kv: kv[1].peak_memory)
            out["peak memory"] = f"{human_bytes(top.peak_memory)} (step {name}; steps run one at a time)"
        if any(e.stand_in for e in est.values()):
            out["note"] = ("steps whose input is made earlier in the run are planned on a stand-in with "
                           "that input's shapes and config")
        missing = [s.name for s in self.steps if s.name not in est]
        if missing:
            out["not estimated"] = ", ".join(missing) + " (input missing)"
        out["report"] = "yes" if self.report is not None else "no"
        return out


def _digest(path: Path) -> str:
    """What a step's input is: its manifest's output hashes, or its file listing when it has none."""
    m = read_manifest(path)
    if m:
        return hashlib.sha256(json.dumps(m.get("outputs"), sort_keys=True).encode()).hexdigest()
    files = sorted((p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in path.rglob("*") if p.is_file()) if path.is_dir() else [(path.name, path.stat().st_size)]
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()


def _step_file(step: Step) -> Path:
    return step.out.parent / STEP_FILE.format(name=step.name)


def step_done(step: Step) -> bool:
    f = _step_file(step)
    if not (step.out.exists() and f.exists() and step.src.exists()):
        return False
    try:
        return json.loads(f.read_text())["fingerprint"] == step.fingerprint(_digest(step.src))
    except (ValueError, KeyError):
        return False


def load_recipe(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise InputError(f"{path}: no such recipe") from None
    except tomllib.TOMLDecodeError as e:
        raise CorruptFileError(f"{path}: not valid TOML ({e})") from None


def plan_recipe(recipe: dict[str, Any], workdir: Path, base_dir: Path | None = None) -> RecipePlan:
    base_dir = base_dir or Path.cwd()
    src_cfg = recipe.get("source") or {}
    if "path" not in src_cfg:
        raise InputError("recipe: [source] needs a path (a Meta original or Hugging Face directory)")
    source = (base_dir / src_cfg["path"]).resolve()
    steps: list[Step] = []
    from .model import detect

    current = source
    if not source.exists() or detect(source) == "meta" or "dtype" in src_cfg:
        hf = workdir / f"hf-{src_cfg.get('dtype', 'float16')}"
        opts = {"dtype": src_cfg.get("dtype", "float16"),
                **{k: src_cfg[k] for k in ("context", "max_shard_size") if k in src_cfg}}
        steps.append(Step("hf", "hf", source, hf, opts))
        current = hf
    if "delta" in recipe:
        d = dict(recipe["delta"])
        if "path" not in d:
            raise InputError("recipe: [delta] needs a path (the published delta directory)")
        if d.get("expect_sha256"):
            d["expect_sha256"] = str((base_dir / d["expect_sha256"]).resolve())
        merged = workdir / "merged"
        steps.append(Step("merged", "apply-delta", current, merged,
                          {"delta": str((base_dir / d.pop("path")).resolve()), **d}))
        current = merged
    for i, art in enumerate(recipe.get("artifact", [])):
        kind = art.get("kind")
        if kind not in _STEPS:
            raise UnsupportedError(f"recipe: artifact {i + 1} has unknown kind '{kind}' (known: {', '.join(sorted(_STEPS))})")
        options = {k: v for k, v in art.items() if k not in ("kind", "name")}
        name = art.get("name") or _STEPS[kind].default_name(options)
        steps.append(Step(name, kind, current, workdir / name, options))
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise InputError(f"recipe: two steps write the same output ({', '.join(sorted({n for n in names if names.count(n) > 1}))}); give them names")
    return RecipePlan(workdir, source, steps, recipe.get("report"))


def run_recipe(plan: RecipePlan) -> dict[str, Path]:
    """Run every step not already done, then the report; returns the artifacts by step name."""
    plan.workdir.mkdir(parents=True, exist_ok=True)
    outputs: dict[str, Path] = {}
    for step in plan.steps:
        if step_done(step):
            info(f"[dim]skip[/] {step.name}: done earlier with the same inputs and options")
        else:
            info(f"[bold cyan]step[/] {step.name} ({step.kind})")
            kind = _STEPS[step.kind]
            kind.run(kind.plan(step.src, step.out, step.options, False), True)
            _step_file(step).write_text(json.dumps({"fingerprint": step.fingerprint(_digest(step.src)),
                                                    "kind": step.kind, "options": step.options}, indent=2))
        outputs[step.name] = step.out
    if plan.report is not None:
        from .report import build_report

        reference = plan.steps[0].out if plan.steps and plan.steps[0].kind == "hf" else plan.source
        if "merged" in outputs:
            reference = outputs["merged"]
        arts = [p for n, p in outputs.items() if p != reference and n not in ("hf", "merged")]
        r = plan.report
        build_report(reference, arts, plan.workdir / "report", r.get("eval"), r.get("mc"),
                     r.get("max_tokens", 8192), force=True)
        outputs["report"] = plan.workdir / "report"
    return outputs
