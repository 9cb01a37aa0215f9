"""Meta -> HF benchmark: convert a ≥ 2 GB synthetic Meta checkpoint in 2 model-parallel shards.

The checkpoint is the random LLaMA-1B-shaped (TinyLlama shapes, GQA 32/4 heads, float16) HF
checkpoint of common.py exported to Meta's layout by xquant's exporter (streamed through mapped
staging files), with a 32,000-piece tokenizer grown from the tiny one. Both are cached in bench-out/.

Prints the conversion time as a ratio to `cp -r` of the same Meta directory (same run, warm page
cache for both; best of 3) and to xquant's HF->HF convert of the source safetensors (same bytes,
same writer: what is specific to Meta's layout), and peak RSS as a ratio to one decoder layer's bytes, also above the
resident base measured by a --dry-run of the same input (which imports and plans everything but
converts no tensor).
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys

import torch
from common import OUT, REPO, Run, dir_bytes, gib, measure, synthetic_llama, xquant_cmd

sys.path.insert(0, str(REPO / "tests"))

from meta_fixtures import extended_sentencepiece  # noqa: E402

from xquant.demo import tiny  # noqa: E402
from xquant.convert.meta_export import export_meta  # noqa: E402
from xquant.io.readers import open_hf_tensors, open_meta_tensors  # noqa: E402


HF, META = OUT / "llama-1b-fp16", OUT / "llama-1b-meta-2shards"


def meta_checkpoint():
    """The cached checkpoints, built in a child process when missing: a child's ru_maxrss is at least
    this process's peak RSS (subprocess starts children with vfork, and exec records the shared
    memory's high-water mark), so building them here (export_meta peaks at 1.84 GiB) would be
    reported as the peak of every conversion measured afterwards."""
    if not (HF / "config.json").exists() or not (META / "params.json").exists():
        subprocess.run([sys.executable, __file__, "--build"], check=True)
    return HF, META


def build() -> None:
    hf = synthetic_llama(HF)
    if not (META / "params.json").exists():
        tok = OUT / "tokenizer-32000.model"
        tok.write_bytes(extended_sentencepiece((tiny.tokenizer_dir() / "tokenizer.model").read_bytes(), 32000))
        export_meta(hf, META, 2, tokenizer=tok, force=True)


def layer_bytes(meta) -> int:
    reader = open_meta_tensors(meta)
    return sum(i.nbytes for i in reader.infos() if "/layers.0." in i.name)


def main() -> None:
    hf, meta = meta_checkpoint()
    size = dir_bytes(meta)
    layer = layer_bytes(meta)
    print(f"input: {meta} ({gib(size)}, 2 shards), one decoder layer {layer / 2**20:.1f} MiB")
    cp_dst, xq_dst, hf_dst = OUT / "meta-cp", OUT / "meta-xquant", OUT / "meta-hf-copy"
    cp_runs: list[Run] = []
    xq_runs: list[Run] = []
    hf_runs: list[Run] = []
    for rep in range(3):
        shutil.rmtree(cp_dst, ignore_errors=True)
        subprocess.run(["sync"])
        cp_runs.append(measure(["cp", "-r", str(meta), str(cp_dst)]))
        shutil.rmtree(xq_dst, ignore_errors=True)
        subprocess.run(["sync"])
        xq_runs.append(measure(xquant_cmd("convert", meta, xq_dst)))
        # The same bytes through the same writer from safetensors: what is Meta-specific.
        shutil.rmtree(hf_dst, ignore_errors=True)
        subprocess.run(["sync"])
        hf_runs.append(measure(xquant_cmd("convert", hf, hf_dst)))
        print(f"  rep {rep}: cp {cp_runs[-1].seconds:.2f} s, xquant convert (Meta) {xq_runs[-1].seconds:.2f} s, "
              f"peak RSS {gib(xq_runs[-1].max_rss)}; HF->HF {hf_runs[-1].seconds:.2f} s "
              f"(rep 0 includes hashing the inputs once)")
    shutil.rmtree(hf_dst, ignore_errors=True)
    dry = " ".join(map(shlex.quote, xquant_cmd("convert", meta, OUT / "meta-dry", "--dry-run", "--json")))
    base = measure(["sh", "-c", f"exec {dry} > /dev/null"]).max_rss
    cp_best = min(r.seconds for r in cp_runs)
    xq_best = min(r.seconds for r in xq_runs)
    rss = max(r.max_rss for r in xq_runs)
    print(f"cp: {cp_best:.2f} s ({size / cp_best / 2**20:.0f} MiB/s)")
    print(f"xquant convert: {xq_best:.2f} s ({size / xq_best / 2**20:.0f} MiB/s); "
          f"first run with input hashing {xq_runs[0].seconds:.2f} s")
    hf_best = min(r.seconds for r in hf_runs)
    print(f"xquant convert HF->HF of the source safetensors (same writer): {hf_best:.2f} s")
    print(f"time ratio (xquant Meta->HF / cp): {xq_best / cp_best:.2f}; "
          f"(xquant Meta->HF / xquant HF->HF): {xq_best / hf_best:.2f}")
    print(f"peak RSS: {gib(rss)} = {rss / layer:.1f} x one layer ({layer / 2**20:.1f} MiB); "
          f"above the --dry-run base ({gib(base)}): {gib(rss - base)} = {(rss - base) / layer:.1f} x one layer")
    print(f"output equals the HF checkpoint the Meta one was exported from: {same_tensors(hf, xq_dst)}")
    shutil.rmtree(cp_dst, ignore_errors=True)
    shutil.rmtree(xq_dst, ignore_errors=True)


def same_tensors(a, b) -> bool:
    """Every tensor bit-identical, one at a time."""
    ra, rb = open_hf_tensors(a), open_hf_tensors(b)
    if sorted(ra.names()) != sorted(rb.names()):
        return False
    return all(torch.equal(ra.get(n), rb.get(n)) for n in ra.names())


if __name__ == "__main__":
    build() if sys.argv[1:] == ["--build"] else main()
