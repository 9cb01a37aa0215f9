"""`xquant report`: size, memory and accuracy of every artifact next to its reference.

Each artifact (and the reference first) is evaluated in its own worker process, in its real
runtime. The results become report.json (schema: xquant/report.schema.json), report.md (opening
with the table publishers print: size, memory, benchmark accuracy and its change, perplexity, KL)
and report.png (size against perplexity, and against benchmark accuracy or KL). With
`model_card=True` each artifact gets a Hugging Face model card (model_card.py).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .calib import bundled_names
from .console import info, progress
from .errors import InputError
from .evaluate.runtimes import detect_kind
from .io.output import Provenance, read_manifest
from .paths import data_dir
from .pipeline import Executable, Output, execute

SCHEMA_PATH = Path(__file__).resolve().parent / "report.schema.json"
DEFAULT_EVAL = ("zh", "en", "code")


def default_mc() -> list[Path]:
    return [data_dir("calibration") / "mc" / "bilingual.csv"]


def _eval_specs(evals: list[str]) -> list[dict[str, str]]:
    specs = []
    for e in evals:
        if e in bundled_names():
            specs.append({"name": e, "source": e, "split": "eval"})
        else:
            p = Path(e)
            if not p.exists():
                raise InputError(f"{e}: neither a bundled eval set ({', '.join(bundled_names())}) nor a file")
            specs.append({"name": p.stem, "source": str(p), "split": "eval"})
    from .calib import load_set

    for spec in specs:  # unreadable, empty or non-UTF-8 text fails here, before any evaluation
        load_set(spec["source"], spec["split"])
    return specs


def _disk_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*")
               if p.is_file() and p.suffix in (".safetensors", ".bin", ".pth", ".gguf"))


def _param_count(reference: Path) -> int:
    from .inspect import inspect_path

    return int(inspect_path(reference)["parameters"])


def _run_worker(job: dict, workdir: Path, name: str, advance=None) -> dict:
    """Run one worker; each byte it writes to the progress pipe is one question done."""
    job_path, out_path = workdir / f"{name}.job.json", workdir / f"{name}.result.json"
    read_end, write_end = os.pipe()
    job_path.write_text(json.dumps({**job, "progress_fd": write_end}))
    with open(workdir / f"{name}.stderr", "w+") as err:
        try:
            proc = subprocess.Popen([sys.executable, "-m", "xquant.evaluate.worker", str(job_path), str(out_path)],
                                    stdout=subprocess.DEVNULL, stderr=err, pass_fds=(write_end,),
                                    env={**os.environ, "XQUANT_QUIET": "1"})
        finally:
            os.close(write_end)
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            while chunk := pipe.read(4096):
                if advance is not None:
                    advance(len(chunk))
        returncode = proc.wait()
        err.seek(0)
        stderr = err.read()
    if returncode != 0 or not out_path.exists():
        last = (stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"evaluation process failed: {last}"}
    return json.loads(out_path.read_text())


def _made_by(path: Path) -> dict[str, Any] | None:
    m = read_manifest(path)
    if not m:
        return None
    made = {"command": m.get("command"), "options": m.get("options"), "xquant_version": m.get("xquant_version")}
    experts = (m.get("gptq") or {}).get("experts")
    if experts:  # GPTQ of a mixture of experts: how many routed experts got round-to-nearest
        made["experts"] = {k: experts[k] for k in ("rtn", "total", "min_tokens")}
    return made


def format_label(path: Path, kind: str, made_by: dict[str, Any] | None) -> str:
    """What a reader calls the format: 'float16', 'int8 (LLM.int8)', 'GPTQ 4-bit g128', 'GGUF q4_k_m'."""
    o = (made_by or {}).get("options") or {}
    if kind == "hf":
        cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
        return str(cfg.get("torch_dtype") or cfg.get("dtype") or "hf")
    if kind == "gguf":
        return f"GGUF {o['outtype']}" if o.get("outtype") else "GGUF"
    if kind == "gptq":
        return f"GPTQ {o.get('bits', '?')}-bit g{o.get('group_size', '?')}" if o else "GPTQ"
    return {"int8": "int8 (LLM.int8)", "nf4": "NF4 (4-bit)"}.get(kind, kind)


def _benchmark_jobs(specs: list[str], limit: int | None) -> list[dict[str, Any]]:
    """Read and check every benchmark directory now (a malformed file fails before any evaluation)."""
    from .evaluate.benchmarks import load_benchmark, parse_spec

    jobs = []
    for spec in specs:
        name, path = parse_spec(spec)
        b = load_benchmark(name, path, limit)
        jobs.append({"name": name, "title": b.layout.title, "path": str(path.resolve()), "limit": limit,
                     "subjects": len(b.subjects), "questions": b.questions})
    return jobs


@dataclass
class ReportRun(Executable):
    """One report as an output of the executor (pipeline.execute): the output rules, the
    temporary sibling, the manifest and the clean-up are the same as every other command's."""

    reference: Path
    artifacts: list[Path]
    out: Path
    kinds: dict[Path, str]
    specs: list[dict[str, str]]
    mc_paths: list[str]
    bench_jobs: list[dict[str, Any]]
    questions: int
    params: int
    settings: dict[str, Any]  # shots, kl_divergence, max_tokens, window, device
    model_card: bool
    provenance: Provenance
    report: dict[str, Any] | None = None

    def outputs(self) -> list[Output]:
        return [Output(self.out, directory=True)]

    def result(self) -> dict[str, Any]:
        return self.report

    def write(self, handles) -> None:
        out = handles[0].path
        rows: list[dict[str, Any]] = []
        with tempfile.TemporaryDirectory() as tmp:
            ref_dir = Path(tmp)
            entries = [(self.reference, "reference"), *((a, "artifact") for a in self.artifacts)]
            for i, (path, role) in enumerate(entries):
                info(f"evaluating {path} ({self.kinds[path]})")
                job = {"artifact": str(path), "role": role, "sets": self.specs, "mc": self.mc_paths,
                       "benchmarks": self.bench_jobs, "ref_dir": str(ref_dir), **self.settings}
                with progress(f"[{i + 1}/{len(entries)}] {path.name}: questions", total=self.questions) as advance:
                    res = _run_worker(job, ref_dir, f"a{i}", advance)
                if role == "reference" and "error" in res:
                    raise InputError(f"{path}: the reference could not be evaluated ({res['error']})")
                size = _disk_size(path)
                made_by = _made_by(path)
                rows.append({
                    "name": path.name, "path": str(path.resolve()), "role": role, "kind": self.kinds[path],
                    "format": format_label(path, self.kinds[path], made_by),
                    "size_bytes": size, "bits_per_weight": size * 8 / self.params if self.params else None,
                    "made_by": made_by, **res,
                })
        report = {"schema": "xquant-report/1", "xquant_version": __version__,
                  "reference": str(self.reference.resolve()), "parameters": self.params,
                  "eval_sets": [s["name"] for s in self.specs], "mc_sets": [Path(p).stem for p in self.mc_paths],
                  "benchmarks": [{**b, "shots": self.settings["shots"], "overall": "mean over questions"}
                                 for b in self.bench_jobs],
                  "kl_divergence": self.settings["kl_divergence"], "artifacts": rows}
        if self.model_card:
            from .model_card import write_model_cards

            report["model_cards"] = write_model_cards(report, publisher_table)
        (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        (out / "report.md").write_text(render_markdown(report))
        plot(report, out / "report.png")
        self.report = report


def build_report(reference: Path, artifacts: list[Path], out: Path, evals: list[str] | None = None,
                 mc: list[Path] | None = None, max_tokens: int = 8192, window: int = 2048,
                 device: str = "cpu", force: bool = False, benchmarks: list[str] | None = None,
                 shots: int = 5, limit: int | None = None, kl_divergence: bool = False,
                 model_card: bool = False) -> dict[str, Any]:
    """Evaluate the reference and each artifact; write report.{json,md,png} into `out`.

    `benchmarks` are NAME=DIR specs (evaluate/benchmarks.py); without them the bundled
    multiple-choice set stands in unless `mc` names files. The manifest records the sha256 of
    the reference and of every artifact evaluated (cached by path, size and time), so a published
    table names the exact files behind it."""
    from .evaluate.mc import load_mc

    reference = Path(reference)
    artifacts = [Path(a) for a in artifacts]
    kinds = {p: detect_kind(p) for p in [reference, *artifacts]}
    specs = _eval_specs(list(evals or DEFAULT_EVAL))
    bench_jobs = _benchmark_jobs(list(benchmarks or ()), limit)
    mc_paths = [str(p) for p in (mc if mc is not None else ([] if bench_jobs else default_mc()))]
    questions = sum(b["questions"] for b in bench_jobs)
    for p in mc_paths:  # fail early on a broken MC file, before any evaluation
        questions += len(load_mc(Path(p)))
    settings = {"shots": shots, "kl_divergence": kl_divergence, "max_tokens": max_tokens, "window": window,
                "device": device}
    prov = Provenance("report", {"evals": [s["source"] for s in specs], "mc": mc_paths,
                                 "benchmarks": [f"{b['name']}={b['path']}" for b in bench_jobs], "shots": shots,
                                 "limit": limit, "kl_divergence": kl_divergence,
                                 "max_tokens": max_tokens, "window": window}, [reference, *artifacts])
    run = ReportRun(reference, artifacts, Path(out), kinds, specs, mc_paths, bench_jobs, questions,
                    _param_count(reference), settings, model_card, prov)
    return execute(run, force=force)


def mean_ppl(row: dict[str, Any]) -> float | None:
    """Geometric mean of the per-set perplexities (one number for plots and sorting)."""
    sets = row.get("sets") or {}
    vals = [s["ppl"] for s in sets.values()]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else None


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def mean_kl(row: dict[str, Any]) -> float | None:
    """Mean KL to the reference, averaged over the eval sets (None where a set has none)."""
    kls = [s.get("kl") for s in (row.get("sets") or {}).values()]
    return sum(kls) / len(kls) if kls and None not in kls else None


def accuracy_columns(report: dict[str, Any]) -> list[tuple[str, Any]]:
    """(column title, row -> result dict or None): each benchmark, or the MC sets standing in."""
    if report.get("benchmarks"):
        return [(b["title"], lambda r, k=b["name"]: (r.get("benchmarks") or {}).get(k)) for b in report["benchmarks"]]
    return [(f"MC {m}", lambda r, k=m: (r.get("mc") or {}).get(k)) for m in report["mc_sets"]]


def publisher_table(report: dict[str, Any]) -> list[str]:
    """The one table publishers print for fp16 / 8-bit / 4-bit: size, memory, accuracy and its change
    against the reference (percentage points), perplexity, mean KL."""
    cols = accuracy_columns(report)
    ref = next(r for r in report["artifacts"] if r["role"] == "reference")
    head = ["artifact", "format", "size on disk", "memory loaded"]
    for title, _ in cols:
        head += [title, "Δ"]
    head += ["PPL", "mean KL"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["artifacts"]:
        if "error" in r:
            lines.append(f"| {r['name']} | {r.get('format', r['kind'])} | {_fmt_bytes(r['size_bytes'])} | "
                         f"skipped: {r['error']} |" + " |" * (len(head) - 4))
            continue
        cells = [r["name"], r.get("format", r["kind"]), _fmt_bytes(r["size_bytes"]), _fmt_bytes(r["memory_bytes"])]
        for _, get in cols:
            res, base = get(r), get(ref)
            cells.append(f"{100 * res['accuracy']:.1f}%" if res else "skipped")
            cells.append("—" if r is ref else f"{100 * (res['accuracy'] - base['accuracy']):+.1f} pt"
                         if res and base else "n/a")
        ppl, kl = mean_ppl(r), mean_kl(r)
        cells.append(f"{ppl:.2f}" if ppl else "n/a")
        cells.append("—" if r is ref else f"{kl:.4g}" if kl is not None else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _pm(x: dict[str, float], scale: float = 1.0, fmt: str = ".4f", unit: str = "") -> str:
    return f"{scale * x['value']:{fmt}}{unit} ± {scale * x['stderr']:{fmt}}{unit}"


def divergence_table(report: dict[str, Any]) -> list[str]:
    """llama-perplexity's --kl-divergence summary per artifact, over every eval set's tokens."""
    rows = [r for r in report["artifacts"] if r.get("divergence")]
    if not rows:
        return []
    head = ["artifact", "tokens", "mean KL", "median", "p90", "p95", "p99", "p99.9", "max KL",
            "same top p", "RMS Δp", "ln(PPL(Q)/PPL(base))"]
    lines = ["", "## Divergence from the reference (as llama-perplexity --kl-divergence reports it)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        d, k = r["divergence"], r["divergence"]["kl"]
        lines.append("| " + " | ".join([
            r["name"], str(d["tokens"]), f"{k['mean']:.6f} ± {k['stderr']:.6f}",
            *(f"{k[q]:.6f}" for q in ("median", "p90", "p95", "p99", "p99_9", "max")),
            _pm(d["same_top_p"], 100, ".2f", "%"), _pm(d["rms_dp"], 100, ".3f", "%"),
            _pm(d["ln_ppl_ratio"], 1, ".6f")]) + " |")
    lines += ["", "Per token of the eval sets against the reference on the same tokens: KL of the next-token "
              "distributions; same top p: share of positions where both pick the same most likely token (± binomial "
              "standard error); RMS Δp: root mean square of the change in the probability given to the correct next "
              "token; ln(PPL(Q)/PPL(base)): the mean change in its negative log-probability."]
    return lines


def benchmark_sections(report: dict[str, Any]) -> list[str]:
    """How each benchmark was run, and accuracy per subject (artifacts as columns)."""
    lines: list[str] = []
    done = [r for r in report["artifacts"] if "error" not in r]
    for b in report.get("benchmarks") or []:
        got = [r for r in done if b["name"] in (r.get("benchmarks") or {})]
        lines += ["", f"## {b['title']}", "",
                  f"`{b['path']}`: {b['subjects']} subjects, {b['questions']} questions"
                  + (f" (at most {b['limit']} per subject)" if b.get("limit") else "")
                  + f", {b['shots']}-shot; the overall accuracy is the mean over questions "
                  f"(mean over subjects in report.json as macro_accuracy)."]
        for r in got:
            res = r["benchmarks"][b["name"]]
            if res["shortened"] or res["truncated"]:
                lines.append(f"- {r['name']}: {res['shortened']} prompts with fewer shots to fit the context"
                             + (f", {res['truncated']} cut to the context even with none" if res["truncated"] else ""))
        if not got:
            continue
        subjects = list(got[0]["benchmarks"][b["name"]]["subjects"])
        lines += ["", "<details><summary>accuracy per subject</summary>", "",
                  "| subject | questions | " + " | ".join(r["name"] for r in got) + " |",
                  "|" + "---|" * (len(got) + 2)]
        for sub in subjects:
            per = [r["benchmarks"][b["name"]]["subjects"][sub] for r in got]
            lines.append(f"| {sub.replace('_', ' ')} | {per[0]['questions']} | "
                         + " | ".join(f"{100 * x['accuracy']:.1f}%" for x in per) + " |")
        lines += ["", "</details>"]
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    sets, mcs = report["eval_sets"], report["mc_sets"]
    ref = next(r for r in report["artifacts"] if r["role"] == "reference")
    head = ["artifact", "format", "runtime", "size", "bits/weight", "memory",
            *(f"ppl {s}" for s in sets), "KL", "top-1", *(f"MC {m}" for m in mcs), "tokens/s"]
    lines = ["# xquant report\n", f"Reference: `{report['reference']}` ({report['parameters']:,} parameters)\n",
             *publisher_table(report), "",
             "Accuracy: first-token prediction over A/B/C/D" + (
                 f", {report['benchmarks'][0]['shots']}-shot on the benchmarks' scored split"
                 if report.get("benchmarks") else " on the bundled multiple-choice set (no --benchmark given)")
             + "; Δ: change against the reference in percentage points. PPL: geometric mean of the eval sets' "
             "perplexities. Memory loaded: resident memory the runtime added while loading and evaluating.",
             *divergence_table(report), *benchmark_sections(report),
             "", "## Details", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["artifacts"]:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['kind']} | skipped: {r['error']} |" + " |" * (len(head) - 3))
            continue
        cells = [r["name"], r.get("format", r["kind"]), r["engine"], _fmt_bytes(r["size_bytes"]),
                 f"{r['bits_per_weight']:.2f}", _fmt_bytes(r["memory_bytes"])]
        for s in sets:
            row = r["sets"][s]
            cell = f"{row['ppl']:.2f}"
            if r is not ref:
                cell += f" ({100 * (row['ppl'] / ref['sets'][s]['ppl'] - 1):+.2f}%)"
            cells.append(cell)
        kls = [r["sets"][s].get("kl") for s in sets]
        t1s = [r["sets"][s].get("top1") for s in sets]
        cells.append("n/a" if None in kls else f"{sum(kls) / len(kls):.5f}")
        cells.append("n/a" if None in t1s else f"{100 * sum(t1s) / len(t1s):.2f}%")
        cells += [f"{100 * r['mc'][m]['accuracy']:.1f}%" if m in r["mc"] else "skipped" for m in mcs]
        tps = [r["sets"][s]["tokens_per_s"] for s in sets]
        cells.append(f"{sum(tps) / len(tps):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    notes = [r for r in report["artifacts"] if any("kl_skipped" in s for s in (r.get("sets") or {}).values())]
    lines.append("")
    lines.append("Perplexity: non-overlapping windows of the context, every token after a window's first scored "
                 "once; in brackets the change against the reference. KL: mean KL divergence of the next-token "
                 "distribution to the reference's, averaged over sets; top-1: share of positions where both pick "
                 "the same token. MC: first-token accuracy on A/B/C/D. Memory: resident memory the runtime added "
                 "while loading and evaluating.")
    for r in notes:
        reason = next(s["kl_skipped"] for s in r["sets"].values() if "kl_skipped" in s)
        lines.append(f"\n- {r['name']}: {reason}")
    for r in report["artifacts"]:  # metrics the worker could not compute (see evaluate/worker.py)
        for note in r.get("notes") or []:
            lines.append(f"\n- {r['name']}: {note['metric']} skipped: {note['skipped']}")
    for r in report["artifacts"]:
        if r.get("made_by"):
            lines.append(f"\n- {r['name']} made by `xquant {r['made_by']['command']}` "
                         f"with {json.dumps(r['made_by']['options'], ensure_ascii=False)}")
            if r["made_by"].get("experts"):
                x = r["made_by"]["experts"]
                lines.append(f"  experts by round-to-nearest: {x['rtn']} of {x['total']} "
                             f"(fewer than {x['min_tokens']} calibration tokens routed to them)")
    for card in report.get("model_cards") or []:
        lines.append(f"\n- model card {card['path']}: " + ("written" if card["written"] else f"not written: {card['note']}"))
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110)
    done = [r for r in report["artifacts"] if "error" not in r]
    for r in done:
        x, y = r["size_bytes"] / 2**20, mean_ppl(r)
        ax.scatter([x], [y], s=60, marker="*" if r["role"] == "reference" else "o")
        ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("size on disk (MiB)")
    ax.set_ylabel("perplexity (geometric mean over eval sets)")
    ax.set_title("size vs perplexity")
    ax.grid(True, alpha=0.3)
    if report.get("benchmarks"):  # one series per benchmark; the reference starred
        for title, get in accuracy_columns(report):
            pts = [(r["size_bytes"] / 2**20, 100 * get(r)["accuracy"], r) for r in done if get(r)]
            ax2.plot([p[0] for p in sorted(pts, key=lambda p: p[0])],
                     [p[1] for p in sorted(pts, key=lambda p: p[0])], marker="o", label=title)
            for x, y, r in pts:
                if r["role"] == "reference":
                    ax2.scatter([x], [y], s=120, marker="*", color="black", zorder=3)
        ax2.set_ylabel("benchmark accuracy (%)")
        ax2.set_title("size vs benchmark accuracy")
        ax2.legend(fontsize=8)
    else:
        for r in done:
            x, y = r["size_bytes"] / 2**20, mean_kl(r)
            if y is None or r["role"] == "reference":
                continue
            ax2.scatter([x], [y], s=60)
            ax2.annotate(r["name"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax2.set_ylabel("mean KL to the reference")
        ax2.set_title("size vs KL divergence")
    ax2.set_xlabel("size on disk (MiB)")
    ax2.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
