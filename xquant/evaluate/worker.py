"""Evaluate one artifact in its own process: `python -m xquant.evaluate.worker JOB.json RESULT.json`.

A separate process per artifact gives each a clean memory measurement (resident memory after the
libraries are imported, compared with the peak once the model is loaded and evaluated) and keeps
one runtime's allocations from skewing the next. The worker writes one byte per multiple-choice
question to the job's `progress_fd` (a pipe the report reads for its progress bar).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import time
from pathlib import Path

import psutil


def _ids_digest(ids: list[int]) -> str:
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def _peak_rss() -> int:
    """This process's own peak resident memory (VmHWM). Not ru_maxrss: Linux carries that over
    from the parent across fork and exec, so a worker started by a large process would report
    the parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def evaluate(job: dict) -> dict:
    import torch

    import numpy as np

    from ..calib import load_set
    from .benchmarks import load_benchmark, score_benchmark
    from .mc import UnscorableError, load_mc, mc_accuracy
    from .metrics import divergence, score_set
    from .runtimes import open_runtime

    torch.manual_seed(0)
    before = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    rt = open_runtime(Path(job["artifact"]), job.get("device", "cpu"))
    load_seconds = time.perf_counter() - t0
    ref_dir = Path(job["ref_dir"])
    is_ref = job["role"] == "reference"
    window = min(int(job["window"]), rt.context)
    result: dict = {"kind": rt.kind, "engine": rt.engine, "load_seconds": load_seconds, "window": window,
                    "sets": {}, "mc": {}}
    fd = job.get("progress_fd")
    tick = (lambda: os.write(fd, b".")) if fd is not None else (lambda: None)
    per_token: list[dict] = []
    for spec in job["sets"]:
        name = spec["name"]
        ids: list[int] = []
        for doc in load_set(spec["source"], spec["split"]).documents:
            ids.extend(rt.encode(doc))
            if len(ids) >= job["max_tokens"]:
                break
        ids = ids[: job["max_tokens"]]
        digest = _ids_digest(ids)
        ref_lp = ref_dir / f"{name}.logprobs.npy"
        if is_ref:
            row = score_set(rt.logits, ids, window, save_ref=ref_lp)
            row.update(kl=0.0, top1=1.0)  # the reference against itself, by definition
            (ref_dir / f"{name}.ids.json").write_text(json.dumps({"digest": digest, "window": window}))
        else:
            ref_meta = json.loads((ref_dir / f"{name}.ids.json").read_text())
            if ref_meta["digest"] != digest:
                row = score_set(rt.logits, ids, window)
                row["kl_skipped"] = "tokenizer differs from the reference's: KL and top-1 are not comparable"
            elif ref_meta["window"] != window:
                row = score_set(rt.logits, ids, window)
                row["kl_skipped"] = f"context window {window} differs from the reference's {ref_meta['window']}"
            else:
                row = score_set(rt.logits, ids, window, ref=ref_lp, per_token=bool(job.get("kl_divergence")))
                if "per_token" in row:
                    per_token.append(row.pop("per_token"))
        row["ids_digest"] = digest
        result["sets"][name] = row
    for path in job.get("mc", []):
        t1 = time.perf_counter()
        name = Path(path).stem
        try:
            acc = mc_accuracy(rt.encode, rt.logits, load_mc(Path(path)), advance=tick)
        except UnscorableError as e:  # one metric this tokenizer cannot give: noted, the rest computed
            result.setdefault("notes", []).append({"metric": f"MC {name}", "skipped": str(e)})
            continue
        acc["seconds"] = time.perf_counter() - t1
        result["mc"][name] = acc
    if per_token:  # the divergence summary over every set's tokens together
        result["divergence"] = divergence(*(np.concatenate([p[k] for p in per_token])
                                            for k in ("kl", "same_top", "lp", "ref_lp")))
    if job.get("benchmarks"):
        result["benchmarks"] = {}
    for b in job.get("benchmarks", []):
        t1 = time.perf_counter()
        name = b["name"]
        # The reference decides how many shots each question gets (dropping shots where the prompt
        # is longer than the context); every artifact then sees the same prompts.
        plan_path = ref_dir / f"benchmark-{name}.shots.json"
        plan = json.loads(plan_path.read_text()) if not is_ref and plan_path.exists() else None
        try:
            res = score_benchmark(rt.encode, rt.logits, load_benchmark(name, Path(b["path"]), b.get("limit")),
                                  int(job.get("shots", 5)), rt.context, plan, tick)
        except UnscorableError as e:
            result.setdefault("notes", []).append({"metric": b.get("title", name), "skipped": str(e)})
            continue
        shots = res.pop("plan")
        if is_ref:
            plan_path.write_text(json.dumps(shots))
        res["seconds"] = time.perf_counter() - t1
        result["benchmarks"][name] = res
    rt.close()
    peak = _peak_rss()
    result["memory_bytes"] = max(0, peak - before)
    result["peak_rss_bytes"] = peak
    return result


def main() -> None:
    import os

    from ..errors import XQuantError

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    job = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    try:
        result = evaluate(job)
    except XQuantError as e:
        result = {"error": str(e)}
    except Exception as e:  # noqa: BLE001 - reported as a skipped row, not a crash of the report
        if os.environ.get("XQUANT_DEBUG") == "1":
            raise
        result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
