"""`xquant report` and `xquant verify`: each artifact reloaded in its real consumer and compared
with the unquantized reference."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import Command, Input, command
from .options import Options, at_least, opt, positive


def _benchmark_dir(value: str, base_dir: Path) -> str:
    """A recipe's NAME=DIR with DIR taken from the recipe's folder, like its other paths."""
    name, sep, directory = value.partition("=")
    if not sep or not directory:
        return value  # the check names what is wrong
    path = Path(directory).expanduser()
    return f"{name}={path if path.is_absolute() else (base_dir / path).resolve()}"


def _benchmark_spec(values: tuple[str, ...]) -> str | None:
    """Each value is NAME=DIR with a known benchmark NAME (the directory is read when the report starts)."""
    from ..evaluate.benchmarks import known

    for v in values:
        name, eq, path = v.partition("=")
        if not eq or not path:
            return f"expected NAME=DIR (NAME one of {', '.join(known())})"
        if name not in known():
            return f"unknown benchmark '{name}' (known: {', '.join(known())})"
    names = [v.partition("=")[0] for v in values]
    dup = next((n for n in names if names.count(n) > 1), None)
    return f"'{dup}' given twice" if dup else None


@dataclass(frozen=True)
class ReportOptions(Options):
    command = "report"

    eval: tuple[str, ...] | None = opt(None, "Eval set name (zh, en, code, mixed) or text/jsonl file; repeatable "
                                             "(default: zh, en, code).")
    mc: tuple[Path, ...] | None = opt(None, "Multiple-choice CSV (C-Eval/MMLU layout); repeatable "
                                            "(default: the bundled bilingual set).")
    max_tokens: int = opt(8192, "Tokens per eval set.", check=at_least(16))
    benchmark: tuple[str, ...] | None = opt(None, "NAME=DIR of a downloaded benchmark in its official layout "
                                                  "(ceval, cmmlu, mmlu); repeatable.", check=_benchmark_spec,
                                            relative=_benchmark_dir)
    shots: int = opt(5, "Dev examples with answers before each benchmark question.", check=at_least(0))
    limit: int | None = opt(None, "Scored questions per benchmark subject (default: all).", check=positive)
    kl_divergence: bool = opt(False, "The full divergence summary as llama-perplexity's --kl-divergence prints it "
                                     "(KL percentiles, same top p, RMS Δp, ln PPL ratio).")
    model_card: bool = opt(False, "Write a Hugging Face model card (README.md) into each artifact.")
    device: str = opt("cpu", "cpu or cuda.", choices=("cpu", "cuda"), fingerprint=False)


@dataclass
class ReportPlan:
    """What a report evaluates (printed by --dry-run); `build_report` carries it out."""

    reference: Path
    artifacts: list[Path]
    out: Path
    options: ReportOptions
    kinds: dict[Path, str] = field(default_factory=dict)
    benchmarks: list[dict[str, Any]] = field(default_factory=list)  # read and checked when planned

    @property
    def title(self) -> str:
        return f"report {self.reference.name} -> {self.out}"

    def rows(self) -> list[dict[str, Any]]:
        from ..io.dtypes import human_bytes
        from ..report import _disk_size

        return [{"artifact": str(p), "role": "reference" if p == self.reference else "artifact",
                 "format": self.kinds[p], "size": human_bytes(_disk_size(p))}
                for p in [self.reference, *self.artifacts]]

    def peak_memory_estimate(self) -> int:
        """One artifact at a time in a worker process: torch and its consumer's code, the model as
        its consumer holds it (float32 weights for HF, the stored bytes for quantized formats) and
        the logits of one window."""
        from ..pipeline import BASE_MEMORY
        from ..report import _disk_size, _param_count

        params = _param_count(self.reference)
        held = max([params * 4 if self.kinds[self.reference] == "hf" else 0,
                    *(_disk_size(p) * (4 if self.kinds[p] == "hf" else 1) for p in self.artifacts)])
        return int(2 * BASE_MEMORY + held)

    def summary(self) -> dict[str, Any]:
        from ..io.dtypes import human_bytes

        o = self.options
        return {"output": str(self.out), "artifacts": len(self.artifacts),
                "eval sets": ", ".join(o.eval or ("zh", "en", "code")),
                "multiple choice": ", ".join(map(str, o.mc)) if o.mc else
                ("none" if o.benchmark and o.mc is None else "bundled bilingual set"),
                "tokens per set": o.max_tokens,
                "benchmarks": ", ".join(f"{b['title']} {b['questions']} questions in {b['subjects']} subjects"
                                        for b in self.benchmarks) + f" ({o.shots}-shot)" if self.benchmarks else "none",
                "estimated peak memory": f"{human_bytes(self.peak_memory_estimate())} (one artifact at a time)"}

    def to_json(self) -> dict[str, Any]:
        return {"title": self.title, "summary": self.summary(), "artifacts": self.rows()}


def _plan(inputs, o: ReportOptions, mode: str) -> ReportPlan:
    from ..evaluate.runtimes import detect_kind

    reference, artifacts = Path(inputs["reference"]), [Path(a) for a in inputs["artifacts"]]
    from ..report import _benchmark_jobs

    kinds = {p: detect_kind(p) for p in [reference, *artifacts]}
    benchmarks = _benchmark_jobs(list(o.benchmark or ()), o.limit)  # a malformed file fails here, --dry-run too
    return ReportPlan(reference, artifacts, Path(inputs["out"]), o, kinds, benchmarks)


def _run(plan: ReportPlan, force: bool, resume: bool) -> dict[str, Any]:
    from ..report import build_report

    o = plan.options
    result = build_report(plan.reference, plan.artifacts, plan.out, list(o.eval) if o.eval else None,
                          list(o.mc) if o.mc is not None else None, o.max_tokens, device=o.device, force=force,
                          benchmarks=list(o.benchmark or ()), shots=o.shots, limit=o.limit,
                          kl_divergence=o.kl_divergence, model_card=o.model_card)
    result["_out"] = str(plan.out)
    return result


def _show(result: dict[str, Any]) -> None:
    from ..console import console

    console.print((Path(result["_out"]) / "report.md").read_text(), markup=False, soft_wrap=True)
    for card in result.get("model_cards") or []:
        if not card["written"]:
            console.print(f"[yellow]model card not written:[/] {card['path']}: {card['note']}")
    skipped = [r["name"] for r in result["artifacts"] if "error" in r]
    if skipped:
        console.print(f"[yellow]skipped:[/] {', '.join(skipped)}")


REPORT = command(Command(
    name="report",
    help="Size, memory, perplexity, KL to the reference and multiple-choice accuracy of each artifact.",
    options=ReportOptions,
    inputs=(Input("reference", "The unquantized reference (HF directory)."),
            Input("artifacts", "Artifacts: HF, int8, NF4, GPTQ directories, GGUF files.", many=True),
            Input("out", "Directory for report.md, report.json, report.png.", flag="--out")),
    plan=_plan, run=_run, show=_show,
))


@dataclass(frozen=True)
class VerifyOptions(Options):
    command = "verify"

    eval: str = opt("mixed", "Eval text (bundled name or file).")
    max_tokens: int = opt(1024, "Tokens of eval text.", check=at_least(16))
    tolerance: float | None = opt(None, "Largest KL divergence accepted (default: the format's).")


@dataclass
class VerifyPlan:
    artifact: Path
    reference: Path
    options: VerifyOptions


def _verify_run(plan: VerifyPlan, force: bool, resume: bool) -> dict[str, Any]:
    from ..verify import verify

    o = plan.options
    return verify(plan.artifact, plan.reference, o.eval, o.max_tokens, o.tolerance)


def _verify_show(s: dict[str, Any]) -> None:
    from ..console import console

    console.print(f"[green]ok[/] {s['artifact']} ({s['engine']}): KL {s['kl']:.5f} <= {s['tolerance']}, "
                  f"top-1 {100 * s['top1']:.1f}%, ppl {s['ppl']:.2f} vs {s['reference_ppl']:.2f}")


VERIFY = command(Command(
    name="verify",
    help="Reload an artifact in its consumer and compare its logits with the reference (exit 7 past tolerance).",
    options=VerifyOptions,
    inputs=(Input("artifact", "Artifact to check (directory or GGUF file)."),
            Input("reference", "The unquantized reference model.", flag="--reference")),
    plan=lambda inputs, o, mode: VerifyPlan(Path(inputs["artifact"]), Path(inputs["reference"]), o),
    run=_verify_run, show=_verify_show, writes=False,
))
