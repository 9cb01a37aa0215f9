"""IO benchmark: copy a ≥ 2 GB synthetic checkpoint through xquant's reader and writer.

Prints throughput as a ratio to `cp` of the same files (measured in the same run, warm page
cache for both) and peak RSS as a ratio to the largest tensor.
Targets (issue 2): throughput ≥ 0.5 × cp; peak RSS ≤ 2 × largest tensor + 1 GiB.
"""

from __future__ import annotations

import shutil
import subprocess

from common import OUT, Run, dir_bytes, gib, measure, synthetic_llama, xquant_cmd

from xquant.io.readers import open_hf_tensors


def main() -> None:
    src = synthetic_llama(OUT / "llama-1b-fp16")
    size = dir_bytes(src)
    largest = max(i.nbytes for i in open_hf_tensors(src).infos())
    print(f"input: {src} ({gib(size)}), largest tensor {gib(largest)}")
    cp_dst, xq_dst = OUT / "io-cp", OUT / "io-xquant"
    cp_runs: list[Run] = []
    xq_runs: list[Run] = []
    for rep in range(3):
        shutil.rmtree(cp_dst, ignore_errors=True)
        subprocess.run(["sync"])
        cp_runs.append(measure(["cp", "-r", str(src), str(cp_dst)]))
        shutil.rmtree(xq_dst, ignore_errors=True)
        subprocess.run(["sync"])
        xq_runs.append(measure(xquant_cmd("convert", src, xq_dst, "--max-shard-size", "1200MB")))
        print(f"  rep {rep}: cp {cp_runs[-1].seconds:.2f} s, xquant convert {xq_runs[-1].seconds:.2f} s "
              f"(rep 0 includes hashing the inputs once; later reps use the hash cache)")
    cp_best = min(r.seconds for r in cp_runs)
    xq_best = min(r.seconds for r in xq_runs)
    rss = max(r.max_rss for r in xq_runs)
    print(f"cp: {cp_best:.2f} s ({size / cp_best / 2**20:.0f} MiB/s)")
    print(f"xquant convert: {xq_best:.2f} s ({size / xq_best / 2**20:.0f} MiB/s); "
          f"first run with input hashing {xq_runs[0].seconds:.2f} s")
    print(f"throughput ratio (cp time / xquant time): {cp_best / xq_best:.2f}  [target >= 0.5]")
    print(f"peak RSS: {gib(rss)} = {rss / largest:.2f} x largest tensor; "
          f"bound 2 x largest + 1 GiB = {gib(2 * largest + 2**30)}  [{'ok' if rss <= 2 * largest + 2**30 else 'OVER'}]")
    shutil.rmtree(cp_dst, ignore_errors=True)
    shutil.rmtree(xq_dst, ignore_errors=True)


if __name__ == "__main__":
    main()
