"""`xquant run RECIPE.toml`: the whole chain from one recipe, each step run once.

A recipe names a source (Meta or HF directory), an optional delta, and the artifacts wanted.
Every table is the options of a registered command (xquant/commands/): `[source]` is `convert`'s,
`[delta]` is `apply-delta`'s, each `[[artifact]]` is its `kind`'s, `[report]` is `report`'s, with
the same names as the command-line flags (underscores for dashes), the same defaults and the same
checks; an unknown key or a wrong type is one line naming the table and the known keys, before any
step runs. The runner plans the chain as a list of steps (a pure value that `--dry-run` prints with
disk and memory estimates), then runs each step through the same command objects and the one
executor the commands use. A step whose output exists and was made from the same inputs with the
same options (recorded in a small step file beside it) is skipped, so re-running after a crash
continues where it stopped. Outputs follow the executor's rules: a path in the work directory that
xquant did not write is never replaced.

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
from typing import Any

from .commands import DRY_RUN, RUN, STAND_IN, Command, artifact_kinds, get
from .commands.options import Options
from .console import info
from .errors import CorruptFileError, InputError, UnsupportedError
from .io.dtypes import human_bytes
from .io.output import read_manifest

STEP_FILE = ".xquant-step-{name}.json"
_TOP_LEVEL = ("source", "delta", "artifact", "report")


@dataclass
class Step:
    """One command run: its inputs (the fed one is `src`), its output and its typed options."""

    name: str
    command: Command
    inputs: dict[str, Path]
    out: Path
    options: Options

    @property
    def kind(self) -> str:
        return self.command.name

    @property
    def src(self) -> Path:
        return self.inputs[self.command.source]

    def plan(self, src: Path | None = None, out: Path | None = None, mode: str = RUN) -> Any:
        inputs = {**self.inputs, self.command.source: src or self.src, "out": out or self.out}
        return self.command.make_plan(inputs, self.options, mode)

    def fingerprint(self) -> str:
        digests = {k: _digest(p) for k, p in sorted(self.inputs.items())}
        blob = json.dumps({"kind": self.kind, "options": self.options.record(fingerprint_only=True),
                           "inputs": digests}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class RecipePlan:
    workdir: Path
    source: Path
    steps: list[Step]
    report: Options | None
    chain: list[str] = field(default_factory=list)  # the source's conversion and the merged delta, in order
    notes: list[str] = field(default_factory=list)
    _estimates: dict[str, Any] | None = field(default=None, repr=False)

    title = "xquant run"

    def estimates(self) -> dict[str, Any]:
        """Each step's output size and peak memory from its own planner (estimate.py); cached."""
        if self._estimates is None:
            from .estimate import estimate_steps

            self._estimates = estimate_steps(
                self.steps, lambda step, src, out, stand_in: step.plan(src, out, STAND_IN if stand_in else DRY_RUN))
        return self._estimates

    def rows(self) -> list[dict[str, Any]]:
        est = self.estimates()
        rows = []
        for s in self.steps:
            e = est.get(s.name)
            rows.append({"step": s.name, "kind": s.kind, "from": s.src.name, "to": str(s.out),
                         "options": json.dumps(s.options.record()),
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
        out["report"] = json.dumps(self.report.record()) if self.report is not None else "no"
        return out


def _digest(path: Path) -> str:
    """What a step's input is: its manifest's output hashes, or its file listing when it has none."""
    if not path.exists():
        return "missing"
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
        return json.loads(f.read_text())["fingerprint"] == step.fingerprint()
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


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UnsupportedError(f"{where}: expected a table, got {type(value).__name__}")
    return dict(value)


def _step(cmd: Command, table: dict[str, Any], where: str, fed: Path, workdir: Path, base_dir: Path,
          name: str | None = None, out_name: str | None = None) -> Step:
    """A step of `cmd` from its recipe table: the paths its other inputs name, then its options."""
    inputs = {cmd.source: fed}
    for inp in cmd.inputs:
        if inp.name in (cmd.source, "out"):
            continue
        value = table.pop(inp.name, None)
        if not isinstance(value, str):
            raise UnsupportedError(f"{where}: needs {inp.name} = \"PATH\" ({inp.help.rstrip('.')})")
        inputs[inp.name] = (base_dir / value).resolve()
    options = cmd.options.from_table(table, where, base_dir)
    name = name or cmd.artifact_name(options)
    return Step(name, cmd, inputs, workdir / (out_name or name), options)


def plan_recipe(recipe: dict[str, Any], workdir: Path, base_dir: Path | None = None) -> RecipePlan:
    base_dir = base_dir or Path.cwd()
    workdir = Path(workdir)
    for key in recipe:
        if key not in _TOP_LEVEL:
            raise UnsupportedError(f"recipe: unknown table [{key}] (known: {', '.join(_TOP_LEVEL)})")
    src_cfg = _table(recipe.get("source") or {}, "recipe: [source]")
    if "path" not in src_cfg:
        raise InputError("recipe: [source] needs a path (a Meta original or Hugging Face directory)")
    source = (base_dir / src_cfg.pop("path")).resolve()
    steps: list[Step] = []
    from .model import detect

    current, chain = source, []
    convert = get("convert")
    if not source.exists() or detect(source) == "meta" or "dtype" in src_cfg:
        src_cfg.setdefault("dtype", "float16")
        steps.append(_step(convert, src_cfg, "recipe: [source]", source, workdir, base_dir, "hf",
                           f"hf-{src_cfg['dtype']}"))
        current = steps[-1].out
        chain.append(steps[-1].name)
    elif src_cfg:
        convert.options.from_table(src_cfg, "recipe: [source]", base_dir)  # checked, though nothing converts
    if "delta" in recipe:
        d = _table(recipe["delta"], "recipe: [delta]")
        if "path" not in d:
            raise InputError("recipe: [delta] needs a path (the published delta directory)")
        d["delta"] = d.pop("path")
        steps.append(_step(get("apply-delta"), d, "recipe: [delta]", current, workdir, base_dir, "merged"))
        current = steps[-1].out
        chain.append(steps[-1].name)
    kinds = artifact_kinds()
    artifacts = recipe.get("artifact", [])
    if not isinstance(artifacts, list):
        raise UnsupportedError("recipe: artifacts are [[artifact]] tables")
    for i, art in enumerate(artifacts):
        art = _table(art, f"recipe: artifact {i + 1}")
        kind = art.pop("kind", None)
        if kind not in kinds:
            raise UnsupportedError(f"recipe: artifact {i + 1} has unknown kind '{kind}' (known: {', '.join(kinds)})")
        name = art.pop("name", None)
        if name is not None and (not isinstance(name, str) or not name or "/" in name or name.startswith(".")):
            raise UnsupportedError(f"recipe: artifact {i + 1} ({kind}): name = {name!r}: a plain file name")
        steps.append(_step(kinds[kind], art, f"recipe: artifact {i + 1} ({kind})", current, workdir, base_dir, name))
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise InputError(f"recipe: two steps write the same output ({', '.join(sorted({n for n in names if names.count(n) > 1}))}); give them names")
    report = None
    if "report" in recipe:
        report = get("report").options.from_table(_table(recipe["report"], "recipe: [report]"),
                                                 "recipe: [report]", base_dir)
    return RecipePlan(workdir, source, steps, report, chain)


def run_recipe(plan: RecipePlan) -> dict[str, Path]:
    """Run every step not already done, then the report; returns the outputs by step name."""
    plan.workdir.mkdir(parents=True, exist_ok=True)
    outputs: dict[str, Path] = {}
    for step in plan.steps:
        if step_done(step):
            info(f"[dim]skip[/] {step.name}: done earlier with the same inputs and options")
        else:
            info(f"[bold cyan]step[/] {step.name} ({step.kind})")
            # force: an earlier run's output of the same command is replaced; anything else in
            # the work directory is refused by the executor. A GPTQ step continues its saved state.
            step.command.run(step.plan(), True, step.command.resumable)
            _step_file(step).write_text(json.dumps({"fingerprint": step.fingerprint(), "kind": step.kind,
                                                    "options": step.options.record()}, indent=2))
        outputs[step.name] = step.out
    if plan.report is not None:
        report = get("report")
        # The report compares every artifact with the last step of the chain (or the source).
        reference = outputs[plan.chain[-1]] if plan.chain else plan.source
        arts = [p for n, p in outputs.items() if n not in plan.chain]
        out = plan.workdir / "report"
        report.run(report.make_plan({"reference": reference, "artifacts": arts, "out": out}, plan.report), True, False)
        outputs["report"] = out
    return outputs
