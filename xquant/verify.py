"""`xquant verify`: reload an artifact in its consumer and compare it with the reference.

The comparison is the KL divergence of next-token distributions on held-out text (plus top-1
agreement), with a tolerance per format: lossless formats must match almost exactly, 8-bit ones
closely, 4-bit ones within what the format loses on a well-calibrated model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .errors import InputError, XQuantError
from .evaluate.runtimes import detect_kind

TOLERANCE = {"hf": 0.005, "int8": 0.05, "nf4": 0.3, "gptq": 0.3, "gguf": 0.3}


class VerifyFailed(XQuantError):
    exit_code = 7


def verify(artifact: Path, reference: Path, eval_set: str = "mixed", max_tokens: int = 1024,
           tolerance: float | None = None) -> dict[str, Any]:
    """KL/top-1 of the artifact against the reference; raises VerifyFailed past the tolerance."""
    kind = detect_kind(artifact)
    detect_kind(reference)
    limit = TOLERANCE[kind] if tolerance is None else tolerance
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        results = []
        for i, (path, role) in enumerate([(reference, "reference"), (artifact, "artifact")]):
            job = {"artifact": str(path), "role": role, "sets": [{"name": "v", "source": eval_set, "split": "eval"}],
                   "mc": [], "max_tokens": max_tokens, "window": 2048, "ref_dir": tmp}
            (tmp_path / f"{i}.job.json").write_text(json.dumps(job))
            subprocess.run([sys.executable, "-m", "xquant.evaluate.worker", str(tmp_path / f"{i}.job.json"),
                            str(tmp_path / f"{i}.out.json")], check=False, capture_output=True)
            out_file = tmp_path / f"{i}.out.json"
            res = json.loads(out_file.read_text()) if out_file.exists() else {"error": "evaluation process failed"}
            if "error" in res:
                raise InputError(f"{path}: cannot be evaluated ({res['error']})")
            results.append(res)
    row = results[1]["sets"]["v"]
    if "kl_skipped" in row:
        raise VerifyFailed(f"{artifact}: {row['kl_skipped']}")
    summary = {"artifact": str(artifact), "kind": kind, "engine": results[1]["engine"], "kl": row["kl"],
               "top1": row["top1"], "ppl": row["ppl"], "reference_ppl": results[0]["sets"]["v"]["ppl"],
               "tolerance": limit, "tokens": row["tokens"]}
    if row["kl"] > limit:
        raise VerifyFailed(f"{artifact}: KL divergence {row['kl']:.4f} to the reference exceeds the "
                           f"{kind} tolerance {limit} (top-1 agreement {100 * row['top1']:.1f}%)")
    return summary
