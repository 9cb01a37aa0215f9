"""IO benchmark: copy a ≥ 2 GB synthetic checkpoint through xquant's reader and writer.

Prints throughput as a ratio to `cp` of the same files (measured in the same run, warm page
cache for both) and peak RSS as a ratio to the largest tensor. xquant is timed twice in each run:
its work inside the process (the IO layer's throughput, what a 130 GB conversion runs at) and the
whole process (adding the ~1.3 s of Python and torch start-up that any command pays once).
Targets (issue 2): throughput ≥ 0.5 × cp; peak RSS ≤ 2 × largest tensor + 1 GiB.
"""

from __future__ import annotations

import shutil
import subprocess
from statistics import median

from common import OUT, Run, Timed, dir_bytes, gib, measure, measure_xquant, synthetic_llama

from xquant.io.readers import open_hf_tensors


REPS = 6  # this VM's page-cache timings vary up to 8x between runs: best and median of several


def main() -> None:
    src = synthetic_llama(OUT / "llama-1b-fp16")
    size = dir_bytes(src)
    largest = max(i.nbytes for i in open_hf_tensors(src).infos())
    print(f"input: {src} ({gib(size)}), largest tensor {gib(largest)}")
    cp_dst, xq_dst = OUT / "io-cp", OUT / "io-xquant"
    cp_runs: list[Run] = []
    xq_runs: list[Timed] = []
    def run_cp() -> None:
        shutil.rmtree(cp_dst, ignore_errors=True)
        subprocess.run(["sync"])
        cp_runs.append(measure(["cp", "-r", str(src), str(cp_dst)]))

    def run_xquant() -> None:
        shutil.rmtree(xq_dst, ignore_errors=True)
        subprocess.run(["sync"])
        xq_runs.append(measure_xquant("convert", src, xq_dst, "--max-shard-size", "1200MB"))

    for rep in range(REPS):
        # Alternate who goes first: on this VM the run right after the other's 2 GB were
        # flushed is measurably slower, whichever program it is.
        for run in ((run_cp, run_xquant) if rep % 2 == 0 else (run_xquant, run_cp)):
            run()
        print(f"  rep {rep}: cp {cp_runs[-1].seconds:.2f} s; xquant convert {xq_runs[-1].wall.seconds:.2f} s "
              f"as a process, {xq_runs[-1].work:.2f} s of work"
              + (" (rep 0 includes hashing the inputs once; later reps use the hash cache)" if rep == 0 else ""))
    later = xq_runs[1:]
    cp_best, cp_med = min(r.seconds for r in cp_runs), median(r.seconds for r in cp_runs)
    work, work_med = min(r.work for r in later), median(r.work for r in later)
    wall, wall_med = min(r.wall.seconds for r in later), median(r.wall.seconds for r in later)
    rss = max(r.wall.max_rss for r in xq_runs)
    print(f"cp: best {cp_best:.2f} s ({size / cp_best / 2**20:.0f} MiB/s), median {cp_med:.2f} s")
    print(f"xquant convert, IO layer (work inside the process): best {work:.2f} s "
          f"({size / work / 2**20:.0f} MiB/s), median {work_med:.2f} s")
    print(f"xquant convert, whole process (+ Python/torch start-up and exit): best {wall:.2f} s, "
          f"median {wall_med:.2f} s; first run with input hashing {xq_runs[0].wall.seconds:.2f} s")
    print(f"throughput ratio, IO layer (cp time / xquant time): best {cp_best / work:.2f}, "
          f"median {cp_med / work_med:.2f}  [target >= 0.5]")
    print(f"throughput ratio, whole process: best {cp_best / wall:.2f}, median {cp_med / wall_med:.2f}")
    print(f"peak RSS: {gib(rss)} = {rss / largest:.2f} x largest tensor; "
          f"bound 2 x largest + 1 GiB = {gib(2 * largest + 2**30)}  [{'ok' if rss <= 2 * largest + 2**30 else 'OVER'}]")
    shutil.rmtree(cp_dst, ignore_errors=True)
    shutil.rmtree(xq_dst, ignore_errors=True)

if __name__ == "__main__":
    main()
