"""GGUF benchmark (named gguf_convert.py: a bench/gguf.py would shadow the gguf package for
scripts run from bench/): a ≥ 2 GB synthetic LLaMA-1B-shaped checkpoint (float16) to GGUF f16 and q8_0.

Prints wall time as a ratio to `cp` of the same weight files (same run, warm page cache for both)
and peak RSS as a ratio to the largest tensor. Optional (`--kquant`): q4_k_m through llama.cpp's
quantizer (writes the f16 stage, then quantizes).
The model directory links the synthetic weights and adds the tiny SentencePiece tokenizer; the
converter pads its vocabulary to the config's 32,000 tokens.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from common import OUT, Run, dir_bytes, gib, measure, synthetic_llama, xquant_cmd

from xquant.demo import tiny
from xquant.io.readers import open_hf_tensors


def model_with_tokenizer():
    src = synthetic_llama(OUT / "llama-1b-fp16")
    dst = OUT / "llama-1b-fp16-gguf-input"
    if not (dst / "config.json").exists():
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir(parents=True)
        for f in src.iterdir():
            os.symlink(f.resolve(), dst / f.name)
        for name in ("tokenizer.model", "tokenizer_config.json"):
            shutil.copy2(tiny.tokenizer_dir() / name, dst / name)
    return src, dst


def main() -> None:
    src, model = model_with_tokenizer()
    weights = sorted(src.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in weights)
    largest = max(i.nbytes for i in open_hf_tensors(src).infos())
    print(f"input: {src} ({gib(size)} in {len(weights)} files), largest tensor {gib(largest)}")
    types = ["f16", "q8_0"] + (["q4_k_m"] if "--kquant" in sys.argv else [])
    cp_dst = OUT / "gguf-cp"
    cp_runs: list[Run] = []
    results: dict[str, list[Run]] = {t: [] for t in types}
    reps = 2
    for rep in range(reps):
        shutil.rmtree(cp_dst, ignore_errors=True)
        cp_dst.mkdir(parents=True)
        subprocess.run(["sync"])
        cp_runs.append(measure(["cp", *map(str, weights), str(cp_dst)]))
        for t in types:
            out = OUT / f"bench-{t}.gguf"
            out.unlink(missing_ok=True)  # start from the same clean state as cp (no old file to replace)
            subprocess.run(["sync"])
            results[t].append(measure(xquant_cmd("gguf", model, out, "--outtype", t, "--force")))
            print(f"  rep {rep}: cp {cp_runs[-1].seconds:.2f} s, gguf {t} {results[t][-1].seconds:.2f} s "
                  f"({gib(out.stat().st_size)}); rep 0 includes hashing the inputs once; every run "
                  f"hashes its output for the manifest")
    shutil.rmtree(cp_dst, ignore_errors=True)
    cp_best = min(r.seconds for r in cp_runs)
    print(f"cp: {cp_best:.2f} s ({size / cp_best / 2**20:.0f} MiB/s)")
    for t, runs in results.items():
        best = min(r.seconds for r in runs)
        rss = max(r.max_rss for r in runs)
        out = OUT / f"bench-{t}.gguf"
        print(f"gguf {t}: {best:.2f} s = {best / cp_best:.2f} x cp ({size / best / 2**20:.0f} MiB/s read), "
              f"output {gib(out.stat().st_size)}; peak RSS {gib(rss)} = {rss / largest:.2f} x largest tensor "
              f"(bound 2 x largest f32 + 1 GiB = {gib(4 * largest + 2**30)}: "
              f"{'ok' if rss <= 4 * largest + 2**30 else 'OVER'})")
        out.unlink(missing_ok=True)
        (out.parent / f"{out.name}.xquant-manifest.json").unlink(missing_ok=True)
    print(f"(input {gib(dir_bytes(src))}; temp files are removed after each run)")


if __name__ == "__main__":
    main()
