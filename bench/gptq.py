"""GPTQ benchmark: `xquant gptq` on a LLaMA-1B-shaped model, 128 × 512-token calibration, on CPU.

A whole 22-layer 1B model takes hours on 2 shared cores, so this quantizes a model with the 1B
widths (hidden 2048, ffn 5632, 32 heads / 4 kv heads, vocab 32000, random float16 weights) and
XQUANT_BENCH_GPTQ_LAYERS decoder layers (default 2), then extrapolates to 22 layers from the
measured per-layer time (layers are identical in shape, so time per layer is constant). The
tokenizer is the tiny model's (its ids are valid in a 32000 vocabulary); the bundled mixed set
holds enough text for 128 disjoint windows of 512 tokens.

Printed: wall time, time per layer, peak RSS as a ratio to one decoder layer's bytes on disk, the
dry-run memory estimate, and the same run through `--engine optimum` side by side (whole model in
memory, as optimum works). XQUANT_BENCH_GPTQ_ENGINES=xquant (or optimum) runs one engine only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

from common import LLAMA_1B, OUT, gib, measure, synthetic_llama, xquant_cmd

from xquant.demo import tiny
from xquant.io.readers import open_hf_tensors

LAYERS = int(os.environ.get("XQUANT_BENCH_GPTQ_LAYERS", "2"))
ENGINES = os.environ.get("XQUANT_BENCH_GPTQ_ENGINES", "xquant,optimum").split(",")
SAMPLES, SEQ_LEN, FULL_LAYERS = 128, 512, LLAMA_1B["num_hidden_layers"]
ARGS = ["--bits", "4", "--group-size", "128", "--samples", str(SAMPLES), "--seq-len", str(SEQ_LEN), "--force"]


def model_dir():
    src = synthetic_llama(OUT / f"llama-1b-widths-{LAYERS}l-fp16", {**LLAMA_1B, "num_hidden_layers": LAYERS})
    for f in tiny.tokenizer_dir().iterdir():
        if not (src / f.name).exists():
            shutil.copy2(f, src / f.name)
    return src


def main() -> None:
    src = model_dir()
    reader = open_hf_tensors(src)
    layer_bytes = sum(i.nbytes for i in reader.infos() if i.name.startswith("model.layers.0."))
    print(f"input: {src}: 1B widths, {LAYERS} of {FULL_LAYERS} layers, float16; one layer {gib(layer_bytes)}; "
          f"calibration {SAMPLES} x {SEQ_LEN} tokens; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    ours, theirs = OUT / "gptq-xquant", OUT / "gptq-optimum"
    plan = json.loads(subprocess.run(xquant_cmd("gptq", src, ours, *ARGS, "--dry-run", "--json"), check=True,
                                     capture_output=True, text=True).stdout)
    if "xquant" in ENGINES:
        xq = run_xquant(src, ours, plan, layer_bytes)
    if "optimum" in ENGINES:
        op = run_optimum(src, theirs, layer_bytes)
        if op is not None and "xquant" in ENGINES:
            print(f"ratio optimum / xquant: time {op.seconds / xq.seconds:.2f}, peak RSS {op.max_rss / xq.max_rss:.2f}")


def run_xquant(src, ours, plan, layer_bytes):
    xq = measure(xquant_cmd("gptq", src, ours, *ARGS))
    layers = [row["seconds"] for row in json.loads((ours / "xquant-manifest.json").read_text())["gptq"]["layers"]]
    per_layer = sum(layers) / len(layers)
    fixed = xq.seconds - sum(layers)
    print(f"xquant:  {xq.seconds:8.1f} s wall for {LAYERS} layers; per layer {per_layer:.1f} s "
          f"({', '.join(f'{s:.1f}' for s in layers)}); outside the layers {fixed:.1f} s")
    print(f"         extrapolated to {FULL_LAYERS} layers: {fixed + FULL_LAYERS * per_layer:8.0f} s "
          f"({(fixed + FULL_LAYERS * per_layer) / 3600:.2f} h)")
    print(f"         peak RSS {gib(xq.max_rss)} = {xq.max_rss / layer_bytes:.1f} x one layer's bytes "
          f"(independent of the layer count; dry-run estimate {plan['summary']['estimated peak memory']})")
    return xq


def run_optimum(src, theirs, layer_bytes):
    try:
        op = measure(xquant_cmd("gptq", src, theirs, *ARGS, "--engine", "optimum"),
                     env={"GPTQMODEL_CPU_WORKERS": "2"})
    except SystemExit as e:
        print(f"optimum: not run ({e})")
        return None
    print(f"optimum: {op.seconds:8.1f} s wall for {LAYERS} layers (model load included); "
          f"~{op.seconds / LAYERS:.1f} s per layer; extrapolated to {FULL_LAYERS} layers ~{op.seconds / LAYERS * FULL_LAYERS:.0f} s")
    print(f"         peak RSS {gib(op.max_rss)} = {op.max_rss / layer_bytes:.1f} x one layer's bytes "
          f"(grows with the model: it holds all of it, in float32 on CPU)")
    return op


if __name__ == "__main__":
    main()
