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

# Step kinds: name -> (function(src, out, options, force) running it, default output name).
_STEPS: dict[str, tuple[Callable[[Path, Path, dict[str, Any], bool], None], Callable[[dict], str]]] = {}


def step_kind(kind: str, default_name: Callable[[dict], str]):
    def deco(fn):
        _STEPS[kind] = (fn, default_name)
        return fn

    return deco


@step_kind("hf", lambda o: f"hf-{o.get('dtype', 'float16')}")
def _hf(src: Path, out: Path, o: dict[str, Any], force: bool) -> None:
    from .convert import plan_convert
    from .pipeline import execute

    execute(plan_convert(src, out, o.get("dtype"), o.get("max_shard_size", "5GB"), o.get("context")), force=force)


@step_kind("int8", lambda o: "int8")
def _int8(src: Path, out: Path, o: dict[str, Any], force: bool) -> None:
    from .pipeline import execute
    from .quant.bnb import plan_int8

    execute(plan_int8(src, out, threshold=o.get("threshold", 6.0), skip_modules=o.get("skip_modules")), force=force)


@step_kind("nf4", lambda o: "nf4")
def _nf4(src: Path, out: Path, o: dict[str, Any], force: bool) -> None:
    from .pipeline import execute
    from .quant.bnb import plan_nf4

    execute(plan_nf4(src, out, compute_dtype=o.get("compute_dtype"), double_quant=o.get("double_quant", False)),
            force=force)


@step_kind("gguf", lambda o: f"model-{o.get('outtype', 'f16')}.gguf")
def _gguf(src: Path, out: Path, o: dict[str, Any], force: bool) -> None:
    from .gguf.plan import plan_gguf
    from .gguf.writer import execute

    imatrix = o.get("imatrix")
    execute(plan_gguf(src, out, o.get("outtype", "f16"), o.get("calibration"),
                      imatrix_chunks=o.get("imatrix_chunks", 64), imatrix=Path(imatrix) if imatrix else None),
            force=force)


@step_kind("gptq", lambda o: f"gptq-{o.get('bits', 4)}bit-g{o.get('group_size', 128)}")
def _gptq(src: Path, out: Path, o: dict[str, Any], force: bool) -> None:
    from .quant.gptq.plan import GPTQOptions, plan_gptq
    from .quant.gptq.run import run_gptq

    opts = dict(o)
    if "calibration" in opts:
        cal = opts["calibration"]
        opts["calibration"] = tuple(cal) if isinstance(cal, list) else (cal,)
    try:
        options = GPTQOptions(**opts)
    except TypeError as e:
        raise UnsupportedError(f"recipe: gptq artifact: {e}") from None
    run_gptq(plan_gptq(src, out, options), force=force, resume=True)


@step_kind("apply-delta", lambda o: "merged")
def _apply_delta(src: Path, out: Path, o: dict[str, Any], force: bool) -> None:
    from .delta import execute, plan_apply_delta

    execute(plan_apply_delta(src, Path(o["delta"]), out, dtype=o.get("dtype"), style=o.get("style"),
                             expect_sha256=Path(o["expect_sha256"]) if o.get("expect_sha256") else None),
            force=force)


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

    title = "xquant run"

    def rows(self) -> list[dict[str, Any]]:
        return [{"step": s.name, "kind": s.kind, "from": s.src.name, "to": str(s.out),
                 "options": json.dumps(s.options), "status": "done" if step_done(s) else "to do"}
                for s in self.steps]

    def summary(self) -> dict[str, Any]:
        from .inspect import inspect_path

        try:
            size = inspect_path(self.source)["size_on_disk"]
        except Exception:  # noqa: BLE001 - the estimate is best effort before the source exists
            size = 0
        return {"workdir": str(self.workdir), "steps": len(self.steps),
                "source size": human_bytes(size),
                "disk estimate": f"about {human_bytes(size * (1 + len(self.steps) * 0.6))} (source + outputs)",
                "report": "yes" if self.report is not None else "no"}


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
        name = art.get("name") or _STEPS[kind][1](options)
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
            fn, _ = _STEPS[step.kind]
            fn(step.src, step.out, step.options, True)
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
