"""GPTQ memory and time at real layer shapes: `xquant gptq` on a one-layer checkpoint with 7B, 13B
or 70B widths (bench/shapes.py), measured against its own `--dry-run` estimate.

The per-layer peak is what a whole model costs (layers are streamed one at a time and identical
in shape), so one layer tells it. Printed: peak RSS measured (ru_maxrss of the child process) and
estimated, their ratio (the estimate is meant to be within 10%), the time of the layer (from the
manifest) and the whole process, and the layer's time extrapolated to the full depth.

    python bench/gptq_shapes.py                 # 7B widths (the default; a few minutes on 2 cores)
    python bench/gptq_shapes.py --shape 13b
    python bench/gptq_shapes.py --shape 70b     # opt-in: needs ~10 GiB free and ~15 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess

from common import gib, measure, xquant_cmd
from shapes import FULL_LAYERS, SHAPES, cache_root, checkpoint, layer_bytes

UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def parse_bytes(text: str) -> int:
    value, unit = text.split()
    return int(float(value) * UNITS[unit])


def run(shape: str, samples: int, seq_len: int, layers: int = 1) -> dict:
    src = checkpoint(shape, layers)
    out = cache_root() / f"out-gptq-{shape}"
    args = ["--bits", "4", "--samples", samples, "--seq-len", seq_len, "--force"]
    plan = json.loads(subprocess.run(xquant_cmd("gptq", src, out, *args, "--dry-run", "--json"), check=True,
                                     capture_output=True, text=True).stdout)
    estimate = parse_bytes(plan["summary"]["estimated peak memory"])
    r = measure(xquant_cmd("gptq", src, out, *args))
    rows = json.loads((out / "xquant-manifest.json").read_text())["gptq"]["layers"]
    shutil.rmtree(out, ignore_errors=True)
    per_layer = sum(row["seconds"] for row in rows) / len(rows)
    return {"shape": shape, "layers": layers, "estimate": estimate, "peak": r.max_rss, "seconds": r.seconds,
            "per_layer": per_layer}


def main() -> None:
    p = argparse.ArgumentParser(description="xquant gptq at real layer shapes")
    p.add_argument("--shape", action="append", choices=sorted(SHAPES), help="repeatable; default 7b")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    a = p.parse_args()
    print(f"gptq --bits 4 --samples {a.samples} --seq-len {a.seq_len}; {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"{'shape':>5} {'layer':>9} {'peak RSS':>10} {'estimate':>10} {'est/peak':>8} {'s/layer':>8} "
          f"{'process':>8} {'full depth':>11}")
    for shape in a.shape or ["7b"]:
        r = run(shape, a.samples, a.seq_len)
        full = FULL_LAYERS[shape] * r["per_layer"]
        print(f"{shape:>5} {gib(layer_bytes(shape)):>9} {gib(r['peak']):>10} {gib(r['estimate']):>10} "
              f"{r['estimate'] / r['peak']:>8.2f} {r['per_layer']:>8.1f} {r['seconds']:>8.1f} "
              f"{full / 3600:>9.2f} h", flush=True)


if __name__ == "__main__":
    main()
